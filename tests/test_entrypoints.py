"""Every deployment in prefect.yaml loads from its entrypoint with no credentials present."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
CREDENTIAL_PREFIXES = ("SNOWFLAKE_", "DBT_CLOUD_", "SLACK_", "PREFECT_API_KEY", "POSTLOAD_")


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_loads_without_credentials(deployment: dict) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CREDENTIAL_PREFIXES)}
    code = (
        "import json, sys; from prefect.flows import load_flow_from_entrypoint; "
        "f = load_flow_from_entrypoint(sys.argv[1]); "
        "print(json.dumps({'name': f.name, 'params': sorted(f.parameters.properties)}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, deployment["entrypoint"]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded["name"] == deployment["name"]
    assert sorted(deployment.get("parameters", {})) == [
        p for p in loaded["params"] if p in deployment.get("parameters", {})
    ]
    assert set(deployment.get("parameters", {})) <= set(loaded["params"])
