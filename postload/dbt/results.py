"""What a dbt build reports: its per-node results, its status, and the error a failed one raises."""

from __future__ import annotations

from dataclasses import dataclass, field

from postload.warehouse import NodeResult

__all__ = ["FAILED_STATUSES", "DbtBuildError", "DbtBuildResult", "NodeResult", "retryable"]

FAILED_STATUSES = frozenset({"error", "fail", "runtime error"})


@dataclass(frozen=True)
class DbtBuildResult:
    selection: str
    nodes: list[NodeResult] = field(default_factory=list)
    invocation_id: str | None = None
    # dbt Cloud run id / URL, or None for Core
    run_id: int | None = None
    run_url: str | None = None
    message: str | None = None
    # Core: the unique ids each `dbt retry` attempt re-ran (empty when nothing was retried)
    retried: list[list[str]] = field(default_factory=list)

    @property
    def failed_nodes(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.status in FAILED_STATUSES]

    @property
    def nothing_selected(self) -> bool:
        return not self.nodes

    @property
    def status(self) -> str:
        if self.failed_nodes:
            return "error"
        if self.nothing_selected:
            return "nothing_selected"
        return "success"


def retryable(nodes: list[NodeResult]) -> bool:
    """Whether a failed build is worth retrying from its failures: a model, seed or snapshot
    errored. A failed *data test* is a finding about the data, so a build whose only failures
    are tests is never retried (dbt Core's ``dbt retry`` and dbt Cloud's ``/rerun/`` alike)."""
    return any(
        n.status == "error" and n.resource_type in ("model", "seed", "snapshot") for n in nodes
    )


class DbtBuildError(RuntimeError):
    """dbt ran but models or tests failed; the message names them. Not a transient failure."""

    def __init__(self, result: DbtBuildResult) -> None:
        self.result = result
        names = ", ".join(
            f"{n.name} ({n.status}: {_first_line(n.message)})" for n in result.failed_nodes
        )
        super().__init__(f"dbt build {result.selection} failed: {names or result.message}")


def _first_line(message: str | None) -> str:
    return (
        (message or "").strip().splitlines()[0][:300]
        if message and message.strip()
        else "no message"
    )
