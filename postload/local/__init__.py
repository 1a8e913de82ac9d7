"""Everything on one machine: the local stack (Prefect server, served deployments, webhook
receiver), serving prefect.yaml's deployments with a warm start, and the demo with its data."""
