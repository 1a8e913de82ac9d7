"""postload.checkout on a real git checkout: a run pinned to one commit, executing another."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from prefect import flow
from prefect.context import FlowRunContext

from postload.checkout import checkout_commit, checkout_mismatch, warn_if_checkout_differs


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> tuple[Path, str, str]:
    """A checkout with two commits, at the second; (folder, first, second)."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "--quiet")
    commits = []
    for n in (1, 2):
        (repo / "flow.py").write_text(f"# {n}\n")
        git(repo, "add", "flow.py")
        git(repo, "-c", "user.name=t", "-c", "user.email=t@example.test", "commit", "-qm", str(n))
        commits.append(git(repo, "rev-parse", "HEAD"))
    return repo, commits[0], commits[1]


def test_a_run_pinned_to_another_commit_than_the_checkout_is_named(
    checkout: tuple[Path, str, str],
) -> None:
    repo, first, second = checkout
    assert checkout_commit(repo) == second
    message = checkout_mismatch(repo, first)
    assert message is not None
    assert f"at commit {second}, but its deployment was deployed at {first}" in message
    assert f"git checkout {first}" in message


def test_no_warning_at_the_deployed_commit_or_without_a_pin_or_a_checkout(
    checkout: tuple[Path, str, str], tmp_path: Path
) -> None:
    repo, first, second = checkout
    assert checkout_mismatch(repo, second) is None
    # Not a commit: no version, or Prefect's default (an md5 of the flow file).
    assert checkout_mismatch(repo, None) is None
    assert checkout_mismatch(repo, "0f343b0931126a20f133d67c2b018a3b") is None
    # No checkout, as in the image (it keeps no .git).
    plain = tmp_path / "plain"
    plain.mkdir()
    assert checkout_commit(plain) is None
    assert checkout_mismatch(plain, first) is None


def test_a_flow_run_reads_its_deployments_version(
    prefect_server: str, checkout: tuple[Path, str, str]
) -> None:
    """The warning inside a real flow run: the version is the flow run's deployment_version
    (what a run of a deployment deployed at `first` carries; tests/test_deploy.py checks the
    server sets it)."""
    repo, first, _ = checkout

    @flow
    def pinned() -> tuple[str | None, str | None]:
        context = FlowRunContext.get()
        assert context and context.flow_run
        unpinned = warn_if_checkout_differs(repo)  # called directly: no deployment
        context.flow_run.deployment_version = first
        return unpinned, warn_if_checkout_differs(repo)

    unpinned, message = pinned()
    assert unpinned is None
    assert message and f"git checkout {first}" in message
