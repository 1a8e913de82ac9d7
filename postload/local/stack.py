"""The whole embedded system in one command: Prefect server + UI, the runner, the receiver.

``postload stack`` (and the README demo) start, as child processes of this one:

1. ``prefect server start`` on loopback, with its SQLite database under ``.postload/prefect``
   (not ``~/.prefect``: the stack's history and concurrency slots stay with the checkout);
2. ``postload receiver``: Fivetran webhooks in, Prefect events out; its secret comes from
   ``POSTLOAD_FIVETRAN_WEBHOOK_SECRET`` or the Secret block, and when neither exists the stack
   creates the block with a random secret. The value is never printed: the banner says where it
   is and the command that reads it (``postload send-sync`` reads it itself);
3. ``postload serve``: every deployment of ``prefect.yaml`` with its triggers and schedules;
4. the failure automations, when the Slack block exists (``postload blocks register``).

Each child runs in its own session, so Ctrl-C reaches only this process, which then stops the
children in reverse order and kills whatever they leave behind (flow runs forked by the runner,
the server's workers): nothing outlives the stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx

from postload.config import FIVETRAN_WEBHOOK_SECRET_ENV, ConfigError, Settings

__all__ = ["LOCAL_SERVER_SETTINGS", "LocalStack", "StackError", "send_sync_end"]

READY_TIMEOUT_SECONDS = 240.0
# How long each part gets to stop on its signal before it is killed (flow runs end, outbox flushes).
CHILD_STOP_TIMEOUT_S = 30.0

# How postload runs a Prefect server of its own: the local stack, and the test and benchmark
# servers, which start theirs with use_local_server_settings(). A value already in the
# environment wins.
LOCAL_SERVER_SETTINGS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # A run woken while another run of its deployment is in progress waits for it (ENQUEUE); the
    # server lets it try again this often (Prefect's default is 30 s).
    "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    # Every dbt node is a task run, recorded from its state events by the server's task run
    # recorder, which by default writes each event in a transaction of its own (batch size 1):
    # ~85 ms of server CPU per node, 18 s per 200-model build, on the cores dbt runs on. In
    # batches of up to 100, flushed every second, that build costs the server ~8 s; task runs
    # reach the UI and API at most a second later.
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    # The event persister (the event feed, what /events/filter reads) writes every 20 events
    # inline, in the handler the run's events arrive through, or every 5 s: a demo build's ~40
    # events took two writes while dbt ran, and a lone sync event waited up to 5 s to be seen.
    # Every second, up to 500 at a time: ~0.02 s less server CPU per demo build
    # (docs/performance.md). Triggers and automations read events before they are written: not
    # delayed.
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
    # A run holds its deployment's concurrency slot through a lease it renews every 225 s. Kept in
    # the server's memory (Prefect's default), the lease is gone after a server restart: the
    # renewal gets 410 Gone and Prefect terminates the run (a build longer than that, killed
    # because the server restarted). On disk under PREFECT_HOME it outlives the restart
    # (tests/system/test_server_restart.py).
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
}


def use_local_server_settings() -> None:
    """Give a Prefect server started later by this process (``prefect_test_harness``) the local
    stack's settings, except those already set in the environment."""
    for name, value in LOCAL_SERVER_SETTINGS.items():
        os.environ.setdefault(name, value)


class StackError(RuntimeError):
    """A part of the local stack did not start; the message says which and shows its log."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


# The kernel hands out ports in this range to outgoing connections (Linux's default range when
# it cannot be read): a port picked inside it may be taken by one before the stack binds it
# (a demo's receiver failed so: "address already in use").
_EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below the range of outgoing connections' ports when there is room."""
    try:
        first_ephemeral = int(_EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    if first_ephemeral > 20_000:
        for port in random.sample(range(20_000, first_ephemeral), 50):
            if port_is_free(host, port):
                return port
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def send_sync_end(
    webhook_url: str,
    secret: str,
    connector_id: str,
    *,
    status: str = "SUCCESSFUL",
    sync_id: str | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    """POST a signed Fivetran ``sync_end`` webhook, as Fivetran does after a sync."""
    from postload.fivetran.webhook import SIGNATURE_HEADER, sign, sync_end_body

    body = sync_end_body(
        connector_id, status=status, sync_id=sync_id or uuid4().hex, created=datetime.now(UTC)
    )
    return httpx.post(
        webhook_url,
        content=body,
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)},
        timeout=timeout,
    )


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise StackError(
                f"{self.name} exited with code {self.process.returncode}; the end of its log "
                f"({self.log}):\n{_tail(self.log)}"
            )

    def stop(self, sig: int, timeout: float) -> bool:
        """Stop the child with sig; False when it had to be killed after timeout seconds."""
        graceful = True
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                graceful = False
                self.process.kill()
                self.process.wait()
        # The child led its own process group: take down anything it left (forked flow runs,
        # the forkserver, the server's workers).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return graceful


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class LocalStack:
    """Start with ``start()`` (or ``with LocalStack(...) as stack``); ``stop()`` undoes all."""

    settings: Settings
    api_port: int = 4200
    receiver_port: int | None = None
    host: str = "127.0.0.1"
    echo: Callable[[str], None] = print
    schedules: bool = True
    apply_automations: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[_Child] = field(default_factory=list)
    webhook_secret: str | None = None
    webhook_secret_source: str | None = None

    # --- addresses -----------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def webhook_url(self) -> str:
        return f"http://{self.host}:{self._receiver_port}/webhooks/fivetran"

    @property
    def _receiver_port(self) -> int:
        return self.receiver_port or self.settings.receiver_port

    @property
    def root(self) -> Path:
        return Path(self.settings.project_dir).resolve()

    @property
    def logs_dir(self) -> Path:
        return self.settings.home_path / "logs"

    def child_env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_UI_URL": self.ui_url,
            **{name: os.environ.get(name, value) for name, value in LOCAL_SERVER_SETTINGS.items()},
            "DO_NOT_TRACK": "1",
            # serve picks up scheduled and triggered runs within a second
            "PREFECT_RUNNER_POLL_FREQUENCY": os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", "1"),
            "POSTLOAD_PROJECT_DIR": str(self.root),
            **self.extra_env,
        }
        env.pop("PREFECT_API_KEY", None)  # a Cloud key must not be sent to the local server
        return env

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        for port, what, option in [
            (self.api_port, "the Prefect server", "--port"),
            (self._receiver_port, "the webhook receiver", "--receiver-port"),
        ]:
            if not port_is_free(self.host, port):
                raise StackError(
                    f"port {port} on {self.host} is taken, so {what} cannot listen there: stop "
                    f"what uses it, or pick another port with {option}"
                )
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            # The runner's start is the longest part (~25 s of imports and warm-up on 2 cores)
            # and needs nothing from the server until it registers the deployments, which it
            # does once the API answers: it starts with the server, not after it.
            self._start_server()
            self._spawn_runner()
            self._wait_for_server()
            self._ensure_webhook_secret()
            self._start_receiver()
            self._wait_for_runner()
            self._apply_automations()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # Reverse order of start: the server last, so the runs and forwards end before the API.
        for child in reversed(self.children):
            sig = signal.SIGINT if child.name != "receiver" else signal.SIGTERM
            if not child.stop(sig, CHILD_STOP_TIMEOUT_S):
                self.echo(
                    f"{child.name} did not stop within {CHILD_STOP_TIMEOUT_S:.0f} s of "
                    f"{signal.Signals(sig).name}: killed (its log: {child.log})"
                )
        self.children.clear()

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    # --- parts ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> _Child:
        log = self.logs_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the stack only; it stops the children
            )
        child = _Child(name, process, log)
        self.children.append(child)
        return child

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            self.check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise StackError(f"{what} not ready after {READY_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.25)

    def _start_server(self) -> None:
        prefect_home = self.settings.home_path / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)
        env = {**self.child_env(), "PREFECT_HOME": str(prefect_home)}
        env.pop("PREFECT_API_URL", None)
        self.echo(f"starting the Prefect server on {self.ui_url} (database in {prefect_home})")
        self._spawn(
            "prefect-server",
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                self.host,
                "--port",
                str(self.api_port),
                "--analytics-off",
            ],
            env,
        )

    def _wait_for_server(self) -> None:
        def healthy() -> bool:
            try:
                return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        self._wait("the Prefect server", healthy)

    def _with_api(self) -> contextlib.AbstractContextManager[Any]:
        from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.api_url, PREFECT_API_KEY: None})

    def _ensure_webhook_secret(self) -> None:
        with self._with_api():
            try:
                self.webhook_secret, self.webhook_secret_source = (
                    self.settings.resolve_fivetran_webhook_secret()
                )
                return
            except ConfigError:
                pass
            from prefect.blocks.system import Secret

            value = secrets.token_hex(32)
            name = self.settings.fivetran_webhook_secret_block
            Secret(value=value).save(name, overwrite=True)
        self.webhook_secret, self.webhook_secret_source = value, f"Secret block {name!r}"
        self.echo(
            f"created the Prefect Secret block {name!r} with a random webhook secret for this "
            "local stack (Fivetran must sign with the same secret: set it in the webhook)"
        )

    def _start_receiver(self) -> None:
        env = self.child_env()
        argv = [_postload(), "receiver", "--host", self.host, "--port", str(self._receiver_port)]
        self.echo(f"starting the webhook receiver on {self.webhook_url}")
        self._spawn("receiver", argv, env)
        health = self.webhook_url.rsplit("/webhooks/", 1)[0] + "/healthz"

        def healthy() -> bool:
            try:
                return httpx.get(health, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        self._wait("the webhook receiver", healthy)

    def _spawn_runner(self) -> None:
        argv = [_postload(), "serve", "--prefect-yaml", str(self._prefect_yaml)]
        if not self.schedules:
            argv.append("--no-schedules")
        self.echo("starting the runner for prefect.yaml's deployments (postload serve)")
        self._spawn("serve", argv, self.child_env())

    def _wait_for_runner(self) -> None:
        from postload.local.serve import deployment_specs

        names = [spec.name for spec in deployment_specs(self._prefect_yaml)]

        def deployed() -> bool:
            return all(self.deployment_id(name) is not None for name in names)

        self._wait("the runner's deployments", deployed)

    @property
    def _prefect_yaml(self) -> Path:
        return self.root / "prefect.yaml"

    def deployment_id(self, name: str) -> Any:
        from prefect.client.orchestration import get_client

        with self._with_api(), get_client(sync_client=True) as client:
            try:
                return client.read_deployment_by_name(f"{name}/{name}").id
            except Exception:
                return None

    def _apply_automations(self) -> None:
        if not self.apply_automations:
            return
        from postload.alerts import apply_automations, notification_block_ids
        from postload.blocks import SLACK_BLOCK

        with self._with_api():
            slack, pagerduty = notification_block_ids()
            if slack is None:
                self.echo(
                    f"automations: not applied, no {SLACK_BLOCK!r} notification block on this "
                    "server (set SLACK_WEBHOOK_URL, run `postload blocks register`, restart)"
                )
                return
            applied = apply_automations(
                slack, pagerduty, heartbeat_seconds=self.settings.run_heartbeat_seconds
            )
        self.echo(f"automations: {', '.join(a.name for a in applied)} applied")

    # --- for people ----------------------------------------------------------------------

    def webhook_secret_lines(self) -> list[str]:
        """Where the webhook secret is and how to read it; never the value."""
        if self.webhook_secret_source == FIVETRAN_WEBHOOK_SECRET_ENV:
            return [
                f"  webhook secret: ${FIVETRAN_WEBHOOK_SECRET_ENV} of the environment the stack "
                "started in (never printed)",
            ]
        if self.webhook_secret_source is None:
            return ["  webhook secret: not set up (the stack has not started)"]
        name = self.settings.fivetran_webhook_secret_block
        # `prefect block inspect` masks a Secret's value: the block itself reads it.
        # The name in double quotes (a JSON string is a Python one): the script goes in single.
        script = f"from prefect.blocks.system import Secret; print(Secret.load({json.dumps(name)}).get())"
        return [
            f"  webhook secret: the Prefect Secret block {name!r} (never printed); to read it:",
            f"    PREFECT_API_URL={self.api_url} {shlex.quote(sys.executable)} -c "
            f"{shlex.quote(script)}",
        ]

    def banner(self) -> str:
        return "\n".join(
            [
                "",
                "postload is running:",
                f"  Prefect UI:   {self.ui_url}",
                f"  Prefect API:  {self.api_url}   (export PREFECT_API_URL={self.api_url})",
                f"  webhook URL:  {self.webhook_url}   (Fivetran signs with the webhook secret)",
                *self.webhook_secret_lines(),
                f"  logs:         {self.logs_dir}",
                "",
                "send a test sync (signed like Fivetran's sync_end, with the secret above):",
                f"  PREFECT_API_URL={self.api_url} postload send-sync <connector_id> "
                f"--url {self.webhook_url}",
                "",
                "Ctrl-C stops everything.",
            ]
        )

    def wait_forever(self) -> Iterator[None]:
        """Yield every second while every child is alive (raises StackError when one dies)."""
        while True:
            self.check_alive()
            yield
            time.sleep(1.0)


def _postload() -> str:
    return str(Path(sys.executable).with_name("postload"))
