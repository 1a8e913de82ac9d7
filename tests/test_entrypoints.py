"""Every deployment in prefect.yaml loads from its entrypoint with no credentials present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ScriptError

from postload.local.serve import DeploymentSpec, load_deployment_flow
from tests.conftest import REPO

DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
CREDENTIAL_PREFIXES = ("SNOWFLAKE_", "DBT_CLOUD_", "SLACK_", "PREFECT_API_KEY", "POSTLOAD_")


LOAD_FLOW = (
    "import json, sys; from prefect.flows import load_flow_from_entrypoint; "
    "f = load_flow_from_entrypoint(sys.argv[1], use_placeholder_flow=False); "
    "print(json.dumps({'name': f.name, 'params': sorted(f.parameters.properties)}))"
)


@pytest.fixture(scope="module")
def loaded_flows() -> dict[str, subprocess.CompletedProcess[str]]:
    """Each entrypoint loaded in a fresh interpreter of its own (nothing another flow imported
    helps it), the interpreters started together: ~9 s of imports each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CREDENTIAL_PREFIXES)}
    procs = {
        d["entrypoint"]: subprocess.Popen(
            [sys.executable, "-c", LOAD_FLOW, d["entrypoint"]],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in DEPLOYMENTS
    }
    done = {}
    for entrypoint, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[entrypoint] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_loads_without_credentials(
    deployment: dict, loaded_flows: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = loaded_flows[deployment["entrypoint"]]
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["name"] == deployment["name"]
    assert sorted(deployment.get("parameters", {})) == [
        p for p in loaded["params"] if p in deployment.get("parameters", {})
    ]
    assert set(deployment.get("parameters", {})) <= set(loaded["params"])


def test_an_entrypoint_whose_import_fails_does_not_load(tmp_path: Path) -> None:
    """No placeholder flow: a flow file that cannot import fails where it is loaded, not in a run."""
    flow_file = tmp_path / "flows" / "broken.py"
    flow_file.parent.mkdir()
    flow_file.write_text(
        "import postload_module_that_does_not_exist\n"
        "from prefect import flow\n\n\n"
        "@flow(name='broken')\ndef broken() -> None: ...\n"
    )
    spec = DeploymentSpec(
        name="broken",
        entrypoint="flows/broken.py:broken",
        description=None,
        tags=[],
        parameters={},
        triggers=[],
        schedules=[],
        concurrency_limit=None,
    )
    with pytest.raises(ScriptError, match="postload_module_that_does_not_exist"):
        load_deployment_flow(tmp_path, spec)
