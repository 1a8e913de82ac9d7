"""The steps of load-and-transform as plain typed functions; the flow only strings them together."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from postload.config import SourceConfig
from postload.dbt import DbtBuildResult
from postload.warehouse import FileLoadResult, TransformRecord


class LoadOutcome(StrEnum):
    NO_NEW_FILES = "no_new_files"
    LOADED = "loaded"
    LOADED_WITH_REJECTS = "loaded_with_rejects"


class LoadVerificationError(RuntimeError):
    """Files were staged but nothing loaded: the data is bad, not the infrastructure."""


@dataclass(frozen=True)
class LoadVerdict:
    source: str
    outcome: LoadOutcome
    files: list[FileLoadResult] = field(default_factory=list)

    @property
    def rows_loaded(self) -> int:
        return sum(f.rows_loaded for f in self.files)

    @property
    def rows_rejected(self) -> int:
        return sum(f.errors_seen for f in self.files)

    @property
    def files_with_rejects(self) -> list[FileLoadResult]:
        return [f for f in self.files if f.errors_seen]

    @property
    def should_transform(self) -> bool:
        return self.outcome is not LoadOutcome.NO_NEW_FILES

    def summary(self) -> str:
        if self.outcome is LoadOutcome.NO_NEW_FILES:
            return f"source {self.source!r}: no new files to load; nothing to transform"
        text = f"source {self.source!r}: loaded {self.rows_loaded} row(s) from {len(self.files)} file(s)"
        if self.rows_rejected:
            text += (
                f"; rejected {self.rows_rejected} malformed line(s) in "
                f"{len(self.files_with_rejects)} file(s) (see the load-rejects artifact)"
            )
        return text


def verify_load(source: SourceConfig, results: list[FileLoadResult]) -> LoadVerdict:
    """The seed's check_load_results: fail when files were present but no row loaded."""
    if not results:
        return LoadVerdict(source.name, LoadOutcome.NO_NEW_FILES)
    verdict = LoadVerdict(
        source.name,
        LoadOutcome.LOADED_WITH_REJECTS
        if any(r.errors_seen for r in results)
        else LoadOutcome.LOADED,
        list(results),
    )
    if verdict.rows_loaded == 0:
        details = "; ".join(
            f"{r.file}: {r.status.value}, {r.errors_seen} of {r.rows_parsed} line(s) rejected"
            + (
                f", first error at line {r.first_error_line}: {r.first_error}"
                if r.first_error
                else ""
            )
            for r in results
        )
        raise LoadVerificationError(
            f"source {source.name!r}: {len(results)} file(s) were staged but 0 rows loaded into "
            f"{source.raw_table} ({details}). Fix or remove the file(s); a corrected file loads "
            "on the next run."
        )
    return verdict


def rejects_table(verdict: LoadVerdict) -> list[dict[str, Any]]:
    return [
        {
            "file": f.file,
            "status": f.status.value,
            "rows_parsed": f.rows_parsed,
            "rows_loaded": f.rows_loaded,
            "rejected": f.errors_seen,
            "first_error_line": f.first_error_line,
            "first_error": f.first_error,
        }
        for f in verdict.files_with_rejects
    ]


def transform_record(
    *,
    flow_run_id: str,
    source: SourceConfig,
    runner: str,
    build: DbtBuildResult,
    started_at: datetime,
    completed_at: datetime,
    covers_loaded_at: datetime | None,
) -> TransformRecord:
    return TransformRecord(
        flow_run_id=flow_run_id,
        source=source.name,
        selection=build.selection,
        runner=runner,
        status=build.status,
        started_at=started_at,
        completed_at=completed_at,
        covers_loaded_at=covers_loaded_at,
        nodes=build.nodes,
        invocation_id=build.invocation_id,
        message=build.message,
    )


STATUS_COLUMNS = (
    "source",
    "last_loaded_at",
    "rows_loaded",
    "rows_rejected",
    "last_transformed_at",
    "transform_status",
    "load_to_transform_minutes",
    "awaiting_transform",
)


def status_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pipeline_status rows, trimmed and formatted for an artifact or a terminal."""
    table = []
    for row in rows:
        out = {}
        for col in STATUS_COLUMNS:
            value = row.get(col)
            if isinstance(value, datetime):
                value = value.strftime("%Y-%m-%d %H:%M:%S")
            elif isinstance(value, float):
                value = round(value, 2)
            out[col] = value
        table.append(out)
    return table


def render_text_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no loads recorded yet)"
    columns = list(rows[0])
    cells = [[("" if r[c] is None else str(r[c])) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, rule, *body])


def freshness_markdown(decision: Any) -> str:  # decision: postload.freshness.FullRunDecision
    """The full-run decision as a table a person reads: who is fresh, who is waited for."""
    lines = [
        f"## Full build: {'running' if decision.run else 'not now'}",
        "",
        decision.reason,
        "",
        "| source | last load | age | allowed staleness | state | past deadline |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in decision.sources:
        loaded = s.latest_loaded_at.strftime("%Y-%m-%d %H:%M:%S") if s.latest_loaded_at else "never"
        age = str(s.age).split(".")[0] if s.age is not None else "-"
        state = "fresh" if s.fresh else "**stale**"
        lines.append(
            f"| {s.name} | {loaded} | {age} | {s.stale_after} | {state} | "
            f"{'**yes**' if s.past_deadline else 'no'} |"
        )
    return "\n".join(lines)


_BAR_WIDTH = 40


def latency_chart_markdown(history: list[dict[str, Any]]) -> str:
    """Load-to-transform latency of the last transforms as a bar chart (oldest first).

    ``history`` rows: ``source``, ``completed_at``, ``load_to_transform_minutes``. Markdown
    artifacts render in the Prefect UI without any plotting library; a fixed-width bar per run
    shows the trend at a glance, and the numbers are there for anyone who wants them.
    """
    rows = [r for r in history if r.get("load_to_transform_minutes") is not None]
    if not rows:
        return "## Load → transform latency\n\nNo transform has covered a load yet."
    longest = max(float(r["load_to_transform_minutes"]) for r in rows) or 1.0
    lines = ["## Load → transform latency (minutes, last runs)", "", "```"]
    for r in rows:
        minutes = float(r["load_to_transform_minutes"])
        bar = "█" * max(1, round(_BAR_WIDTH * minutes / longest))
        when = r["completed_at"].strftime("%m-%d %H:%M") if r.get("completed_at") else "?"
        lines.append(f"{when} {r['source'][:12]:<12} {bar} {minutes:.2f}")
    lines.append("```")
    return "\n".join(lines)


def publish_status(
    warehouse: Any,
) -> list[dict[str, Any]]:  # warehouse: postload.warehouse.Warehouse
    """After every transform: the pipeline-status table and the latency chart, as artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = status_table(warehouse.pipeline_status())
    create_table_artifact(
        key="pipeline-status",
        table=table,
        description=f"postload pipeline status ({warehouse.kind}: {warehouse.location})",
    )
    create_markdown_artifact(
        key="load-to-transform",
        markdown=latency_chart_markdown(warehouse.transform_history(limit=30)),
        description="load-to-transform latency of the latest transforms",
    )
    return table
