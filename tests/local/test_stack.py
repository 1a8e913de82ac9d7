"""`postload stack` as a person runs it: start, a signed webhook to a finished dbt run, Ctrl-C.

The command starts its own Prefect server (not the session's test server), the receiver and the
runner, in a copy of the checkout whose sources are fed by simulated Fivetran connectors. The
webhook is sent with `postload send-sync`, the command the stack's banner tells people to use.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from postload.config import Settings
from postload.local.stack import _EPHEMERAL_PORTS, LOCAL_SERVER_SETTINGS, LocalStack, free_port
from tests.conftest import (
    REPO,
    PostloadHome,
    assert_no_secret_in,
    land_and_load,
    make_home,
    suite_secret,
)

# Starts real processes (a Prefect server, a served runner, a receiver): the system tier.
pytestmark = pytest.mark.system

POSTLOAD = str(Path(sys.executable).with_name("postload"))
SECRET = suite_secret("local stack: webhook secret", "whsec-local-stack-51f0")
START_TIMEOUT = 300.0
RUN_TIMEOUT = 240.0

T = TypeVar("T")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def wait_for(check: Callable[[], T | None], what: str, timeout: float, proc: subprocess.Popen) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"`postload stack` exited ({proc.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping remains


@dataclass
class RunningStack:
    home: PostloadHome
    proc: subprocess.Popen
    output: Path
    api_url: str
    webhook_url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("stack")
    home = make_home(root / "checkout", monkeypatch)
    shutil.copy(REPO / "prefect.yaml", home.root / "prefect.yaml")
    shutil.copytree(
        REPO / "flows", home.root / "flows", ignore=shutil.ignore_patterns("__pycache__")
    )
    config = yaml.safe_load((home.root / "postload.yaml").read_text())
    for source in config["sources"]:
        source["loader"] = {"type": "fivetran", "connector_id": f"conn_{source['name']}"}
    (home.root / "postload.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    api_port, receiver_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")},
        **home.env,
        "POSTLOAD_FIVETRAN_WEBHOOK_SECRET": SECRET,
    }
    output = root / "stack.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [
                POSTLOAD,
                "stack",
                "--port",
                str(api_port),
                "--receiver-port",
                str(receiver_port),
                "--no-schedules",  # no sweep runs interleaving with the test
            ],
            cwd=home.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # As a shell starts a background job (`postload stack &`, a CI step): SIGINT ignored,
            # which its children would inherit. Ctrl-C must stop everything all the same.
            preexec_fn=_ignore_sigint,
        )
    try:
        wait_for(
            lambda: "postload is running" in output.read_text(),
            "the stack's banner",
            START_TIMEOUT,
            proc,
        )
        yield RunningStack(
            home,
            proc,
            output,
            f"http://127.0.0.1:{api_port}/api",
            f"http://127.0.0.1:{receiver_port}/webhooks/fivetran",
            env,
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        monkeypatch.undo()


def flow_runs(api_url: str, deployment: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
        )


def models_built(api_url: str, flow_run_id: Any) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {
        t.name.removeprefix("model ")
        for t in tasks
        if t.name.startswith("model ") and t.state_name == "Completed"
    }


def test_stack_server_gets_postload_settings_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:

    batch = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"
    monkeypatch.setenv(batch, "7")
    monkeypatch.delenv("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL", raising=False)

    env = LocalStack(Settings(_env_file=None, project_dir=tmp_path)).child_env()

    assert env[batch] == "7"
    assert env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"] == "1"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert set(LOCAL_SERVER_SETTINGS) <= set(env)


def test_banner_says_where_everything_is(running_stack: RunningStack) -> None:
    banner = running_stack.output.read_text()
    assert f"Prefect UI:   {running_stack.api_url.removesuffix('/api')}" in banner
    assert f"webhook URL:  {running_stack.webhook_url}" in banner
    assert "postload send-sync <connector_id>" in banner
    # where the secret is (here the environment the stack started in), never the secret
    assert "  webhook secret: $POSTLOAD_FIVETRAN_WEBHOOK_SECRET of the environment" in banner
    assert SECRET not in banner


def test_signed_webhook_runs_dbt_for_its_source(running_stack: RunningStack) -> None:
    land_and_load(running_stack.home, "events", 1)  # the "sync": rows in raw.events

    sent = subprocess.run(
        [POSTLOAD, "send-sync", "conn_events", "--url", running_stack.webhook_url],
        cwd=running_stack.home.root,
        env={**running_stack.env, "PREFECT_API_URL": running_stack.api_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "→ 202" in sent.stdout

    expected = {"stg_events", "fct_daily_events"}

    def finished_build() -> set[str] | None:
        # The server records task runs from their events in batches, flushed every second
        # (LOCAL_SERVER_SETTINGS): a Completed run's node tasks may still be on their way.
        for run in flow_runs(running_stack.api_url, "transform-on-sync"):
            if (
                run.state_name == "Completed"
                and (built := models_built(running_stack.api_url, run.id)) >= expected
            ):
                return built
        return None

    built = wait_for(
        finished_build, "a completed transform-on-sync run", RUN_TIMEOUT, running_stack.proc
    )
    assert built == expected


def test_ctrl_c_stops_everything_it_started(running_stack: RunningStack) -> None:
    tree = descendants(running_stack.proc.pid)
    names = {Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") for pid in tree}
    assert any(b"prefect server start" in n for n in names)
    assert any(b"postload receiver" in n for n in names)
    assert any(b"postload serve" in n for n in names)

    running_stack.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    assert running_stack.proc.wait(timeout=120) == 0
    output = running_stack.output.read_text()
    assert "stopped" in output.splitlines()[-1]
    assert "did not stop" not in output, output  # each part stopped on its signal, none killed
    # the webhook secret it was given reached no log of the stack or its children
    logs = sorted((running_stack.home.root / ".postload" / "logs").glob("*.log"))
    assert {log.name for log in logs} >= {"receiver.log", "serve.log"}
    for log in [running_stack.output, *logs]:
        assert_no_secret_in(log)

    deadline = time.monotonic() + 30
    while (left := {pid for pid in tree if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def test_free_ports_are_below_the_ports_outgoing_connections_take() -> None:
    """Picked inside that range, a port could go to an outgoing connection before the stack
    binds it (a demo's receiver once failed with "address already in use")."""
    first_ephemeral = int(_EPHEMERAL_PORTS.read_text().split()[0])
    for _ in range(20):
        port = free_port()
        assert port < first_ephemeral
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
