"""Flow runs forked from the warm forkserver: a real flow run through Prefect's own subprocess path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO

# The flow lives in a folder added to sys.path only after the forkserver started, as `postload
# serve` starts it before loading prefect.yaml's entrypoints (which adds their folders).
FLOW_MODULE = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    from prefect import flow

    @flow(name="where-am-i")
    def where_am_i(out: str) -> None:
        Path(out).write_text(json.dumps({
            "pid": os.getpid(),
            "parent": os.getppid(),
            # what this process imported before the flow body ran
            "dbt_preloaded": "dbt.cli.main" in sys.modules,
            "prefect_dbt_preloaded": "prefect_dbt" in sys.modules,
            # a fork is only safe from a parent without running threads
            "parent_threads": [
                open(f"/proc/{os.getppid()}/task/{tid}/comm").read().strip()
                for tid in os.listdir(f"/proc/{os.getppid()}/task")
                if int(tid) != os.getppid()
            ],
        }))
    """
)

SCRIPT = textwrap.dedent(
    """
    import json, os, sys

    from postload.local import _warm_start

    if __name__ == "__main__":
        # As `postload serve` does: the forkserver imports while this process does its own.
        started = _warm_start.start_preloading()
        from prefect.flow_engine import run_flow_in_subprocess

        sys.path.insert(0, sys.argv[2])
        from late_flow import where_am_i

        installed = _warm_start.install()
        process = run_flow_in_subprocess(where_am_i, parameters={"out": sys.argv[1]})
        process.join()
        print(json.dumps({"started": started, "installed": installed, "pid": os.getpid(),
                          "exitcode": process.exitcode, "kind": type(process).__name__}))
    """
)


def test_flow_run_is_forked_from_a_preloaded_process_without_threads(
    prefect_server: str, tmp_path: Path
) -> None:
    script = tmp_path / "warm.py"
    script.write_text(SCRIPT)
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "late_flow.py").write_text(FLOW_MODULE)
    out = tmp_path / "child.json"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(REPO)}

    done = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "late")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    parent = json.loads(done.stdout.strip().splitlines()[-1])
    assert parent["started"] is True and parent["installed"] is True
    assert parent["kind"] == "ForkServerProcess"
    assert parent["exitcode"] == 0
    child = json.loads(out.read_text())
    assert child["parent"] != parent["pid"]  # forked by the forkserver, not by the runner
    assert child["dbt_preloaded"] and child["prefect_dbt_preloaded"]
    # No Python or library thread runs in the forkserver. The one exception allowed is jemalloc's
    # background thread, which pyarrow starts on import (pyarrow comes with fakesnow, a test
    # dependency; the Snowflake connector imports it when present): jemalloc's own fork handlers
    # lock and reset its state around fork(), so the child is consistent.
    assert set(child["parent_threads"]) <= {"jemalloc_bg_thd"}
