"""Whether a flow run executes the commit its deployment was deployed at.

Deployments record the commit they deploy as their ``version`` (POSTLOAD_VERSION, prefect.yaml).
The image of prefect.docker.yaml is that commit; a process worker runs whatever its checkout is
at. Each flow calls :func:`warn_if_checkout_differs` first, so a checkout left behind (or moved
ahead) shows in the run's log instead of going unnoticed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

COMMIT = re.compile(r"[0-9a-f]{40}")


def checkout_commit(project_dir: Path) -> str | None:
    """HEAD of the git checkout at project_dir; None where there is none (the image keeps no
    .git) or git is missing or refuses it."""
    try:
        result = subprocess.run(
            ["git", "-C", str(project_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    head = result.stdout.strip()
    return head if result.returncode == 0 and COMMIT.fullmatch(head) else None


def checkout_mismatch(project_dir: Path, deployed: str | None) -> str | None:
    """The warning for a run whose deployment is pinned to a commit (a full SHA as its version)
    while project_dir's checkout is at another; None otherwise. Versions that are not a commit
    (Prefect's default, a hash of the flow file, under `postload serve`) are not checked."""
    if not deployed or not COMMIT.fullmatch(deployed):
        return None
    head = checkout_commit(project_dir)
    if head is None or head == deployed:
        return None
    return (
        f"this run executes the checkout at {project_dir}, at commit {head}, but its deployment "
        f"was deployed at {deployed}: run `git checkout {deployed}` there (or deploy {head})"
    )


def warn_if_checkout_differs(project_dir: Path) -> str | None:
    """Log :func:`checkout_mismatch` for the current flow run as a warning; return it."""
    from prefect.context import FlowRunContext
    from prefect.logging import get_run_logger

    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    message = checkout_mismatch(project_dir, flow_run.deployment_version if flow_run else None)
    if message:
        get_run_logger().warning(message)
    return message
