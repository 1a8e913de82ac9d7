"""What postload shows people: the pipeline status, the latency chart and the runs' summaries,
as Prefect artifacts or terminal text."""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

from postload.warehouse import naive_utc

if TYPE_CHECKING:
    from postload.dbt import DbtBuildResult
    from postload.freshness import FullRunDecision
    from postload.load import LoadVerdict
    from postload.sources import SourceTable
    from postload.warehouse import Warehouse


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


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


def freshness_markdown(decision: FullRunDecision) -> str:
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


def pipeline_status(
    warehouse: Warehouse, tables: dict[str, list[SourceTable]] | None = None
) -> list[dict[str, Any]]:
    """The ``pipeline_status`` rows, with the sources postload does not load filled in.

    The view knows what postload loaded (``ops.load_log``) and built. A Fivetran source writes no
    load log: its last load is its tables' newest ``loaded_at_field`` (one watermark query), and
    it awaits a transform when any table has rows no build covered.
    """
    rows = {row["source"]: row for row in warehouse.pipeline_status()}
    if tables:
        marks = warehouse.watermarks([t for ts in tables.values() for t in ts])
        for source, source_tables in tables.items():
            row = rows.get(source)
            if row is not None and row.get("last_loaded_at") is not None:
                continue  # postload loaded it: the load log says when
            own = [marks[t.key] for t in source_tables if t.key in marks]
            latest = max((m.latest_loaded_at for m in own if m.latest_loaded_at), default=None)
            if latest is None and row is None:
                continue  # never loaded, never built: nothing to show yet
            row = row if row is not None else dict.fromkeys(STATUS_COLUMNS) | {"source": source}
            row["last_loaded_at"] = naive_utc(latest)
            row["awaiting_transform"] = any(m.pending for m in own)
            rows[source] = row
    return [rows[name] for name in sorted(rows)]


def publish_status(
    warehouse: Warehouse, tables: dict[str, list[SourceTable]] | None = None
) -> list[dict[str, Any]]:
    """After every transform: the pipeline-status table and the latency chart, as artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = status_table(pipeline_status(warehouse, tables))
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


def load_and_transform_markdown(verdict: LoadVerdict, build: DbtBuildResult | None) -> str:
    """The load-and-transform run's summary: the load, the build and each node's outcome."""
    lines = [f"## {verdict.source}", "", f"- load: {verdict.summary()}"]
    if build is None:
        lines.append("- transform: skipped (no new data)")
    else:
        lines.append(f"- transform: `dbt build {build.selection}` → **{build.status}**")
        for node in build.nodes:
            lines.append(f"  - `{node.unique_id}`: {node.status}")
        if build.run_url:
            lines.append(f"- dbt Cloud run: {build.run_url}")
    return "\n".join(lines)


def transform_on_sync_markdown(reason: str, builds: list[dict[str, Any]]) -> str:
    """The transform-on-sync run's summary: each build, its sources and its outcome."""
    lines = [
        f"- `dbt build {b['selection']}` for {', '.join(b['sources'])}: {b['status']}"
        for b in builds
    ]
    return "\n".join([f"## transform-on-sync ({reason})", *(lines or ["- nothing pending"])])
