"""Fivetran: its webhook's model and signature, the receiver that turns deliveries into Prefect
events (with its outbox), and the Prefect Cloud webhook template for sending them there directly."""
