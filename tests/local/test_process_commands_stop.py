"""The commands that start processes stop every one of them on Ctrl-C (SIGINT) and on SIGTERM,
also when started as a background job (SIGINT ignored, as a shell starts `postload demo &`).

`postload stack` is covered end to end in test_stack.py; here `postload demo --keep-running`
is stopped while its stack starts (the handlers are installed before anything is spawned), and
`postload receiver`, which is one process, and `postload serve`, whose warm-start process must
not outlive it, are checked to leave nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postload.local.stack import free_port, port_is_free
from tests.conftest import REPO, suite_secret
from tests.local.test_stack import POSTLOAD, _ignore_sigint, alive, descendants

pytestmark = pytest.mark.system

SECRET = suite_secret("process commands: webhook secret", "whsec-stop-test-8c21")
SPAWN_TIMEOUT = 120.0
STOP_TIMEOUT = 90.0


def _cmdlines(pids: set[int]) -> list[bytes]:
    lines = []
    for pid in pids:
        with contextlib.suppress(OSError):
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "))
    return lines


def _start(
    argv: list[str], tmp_path: Path, cwd: Path | None = None, **env: str
) -> subprocess.Popen[bytes]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "POSTLOAD_"))},
        "POSTLOAD_PROJECT_DIR": str(REPO),
        "POSTLOAD_HOME": str(tmp_path / "home"),
        "POSTLOAD_FIVETRAN_WEBHOOK_SECRET": SECRET,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        **env,
    }
    with (tmp_path / "out.log").open("wb") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd or tmp_path,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_ignore_sigint,  # a background job
        )


def _wait_until(predicate, what: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the command exited ({proc.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _assert_all_gone(tree: set[int], ports: list[int], tmp_path: Path) -> None:
    # Seconds, not the ~20 s a warm-start process still importing would take to notice alone.
    deadline = time.monotonic() + 10
    while (left := {pid for pid in tree if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, (_cmdlines(left), (tmp_path / "out.log").read_text())
    taken = [port for port in ports if not port_is_free("127.0.0.1", port)]
    assert not taken, f"ports still held: {taken}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_demo_keep_running_stops_everything_it_started(sig: signal.Signals, tmp_path: Path) -> None:
    api_port = free_port()
    proc = _start([POSTLOAD, "demo", "--keep-running", "--port", str(api_port)], tmp_path)
    try:
        # Stopped once its Prefect server and runner exist: what a person's Ctrl-C or a
        # `kill %1` finds, whichever part of the story it is in.
        def started() -> bool:
            names = _cmdlines(descendants(proc.pid))
            return any(b"prefect server start" in n for n in names) and any(
                b"postload serve" in n for n in names
            )

        _wait_until(started, "the demo's server and runner", SPAWN_TIMEOUT, proc)
        tree = descendants(proc.pid)
        proc.send_signal(sig)
        assert proc.wait(timeout=STOP_TIMEOUT) != 0  # the story did not finish: not a success
        _assert_all_gone(tree, [api_port], tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_receiver_stops_on_signals(sig: signal.Signals, tmp_path: Path) -> None:
    port = free_port()
    proc = _start(
        [POSTLOAD, "receiver", "--port", str(port)],
        tmp_path,
        PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",  # forwarding is not the point
    )
    try:
        _wait_until(lambda: not port_is_free("127.0.0.1", port), "the receiver's port", 60, proc)
        tree = descendants(proc.pid) | {proc.pid}
        proc.send_signal(sig)
        assert proc.wait(timeout=STOP_TIMEOUT) == 0
        _assert_all_gone(tree, [port], tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_its_warm_start_process_on_signals(sig: signal.Signals, tmp_path: Path) -> None:
    # The API does not answer, so serve waits for it with its warm-start process (the process
    # flow runs fork from) already started: the moment a stop must take that process too.
    proc = _start(
        [POSTLOAD, "serve"],
        tmp_path,
        cwd=REPO,  # serve reads prefect.yaml and the flows from the checkout
        PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
    )
    try:
        _wait_until(lambda: bool(descendants(proc.pid)), "the warm-start process", 60, proc)
        tree = descendants(proc.pid) | {proc.pid}
        proc.send_signal(sig)
        proc.wait(timeout=STOP_TIMEOUT)
        _assert_all_gone(tree, [], tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# serve, stopped in the instant between its warm-start process being spawned and multiprocessing
# recording that process's pid: the signal is sent from inside the spawn, so the window is hit
# every time rather than once in many CI runs.
STOPPED_WHILE_SPAWNING = """
import os, signal, sys
from multiprocessing import util

from postload.cli import _stop_on_ctrl_c_and_sigterm
from postload.local.serve import serve_deployments

spawn = util.spawnv_passfds

def spawn_then_stop(path, args, passfds):
    pid = spawn(path, args, passfds)
    if any("forkserver" in str(arg) for arg in args):
        print(pid, flush=True)
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    return pid

util.spawnv_passfds = spawn_then_stop
_stop_on_ctrl_c_and_sigterm()
try:
    serve_deployments(sys.argv[1], api_timeout_s=60)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stopped_while_spawning_its_warm_start_process_leaves_none(
    sig: signal.Signals, tmp_path: Path
) -> None:
    script = tmp_path / "stop_while_spawning.py"
    script.write_text(STOPPED_WHILE_SPAWNING)
    proc = _start(
        [sys.executable, str(script), str(REPO / "prefect.yaml"), sig.name],
        tmp_path,
        PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
        PYTHONPATH=str(REPO),
    )
    try:
        proc.wait(timeout=STOP_TIMEOUT)
        lines = (tmp_path / "out.log").read_text().split()
        assert lines[-1] == "stopped", lines
        forkserver = int(lines[0])
        # Gone within seconds: left alone it would live until its ~20 s of imports were done.
        _assert_all_gone({forkserver}, [], tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
