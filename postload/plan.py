"""Decide what a sync-triggered transform must build: from the warehouse, never from the event.

Events (Fivetran ``sync_end`` webhooks, the load flow's own "loaded" events, the sweep schedule)
only wake the transform up. What it builds comes from each table's watermark: rows loaded after
the newest one a successful transform covered. A source is one table (a copy source) or a dbt
source's many tables (a Fivetran connector's schema); Fivetran's ``sync_end`` does not say which
tables changed, but their watermarks do, so a sync that changed 2 of a connector's 20 tables
builds what reads those 2 (``source:<src>.<table>+`` each), unless the source configures its own
``selection``. So a redelivered webhook finds nothing pending,
a burst of syncs collapses into one build, a sync that changed nothing builds nothing, and a lost
webhook is caught by the next run or sweep — dbt's ``source_status:fresher+`` idea, kept in the
warehouse instead of in ``sources.json`` files.

On dbt Cloud the pending sources are grouped by the job that builds them (a source's
``dbt_cloud_job_id``, else the default job): one run per job, each with its group's selection.
On dbt Core there is one group, so one invocation.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from postload.config import PipelineConfig, Selection, SourceConfig
from postload.sources import SourceTable
from postload.warehouse import Watermark

__all__ = [
    "BuildGroup",
    "TransformPlan",
    "pending_tables",
    "plan_transform",
    "source_selection",
    "union_selection",
]


class _PendingSources:
    """What a whole plan and each of its groups say alike about the sources they build."""

    sources: list[SourceConfig]
    # per source, per pending table: its newest row when the plan was made
    tables: dict[str, dict[str, datetime]]

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def covers(self) -> dict[str, datetime]:
        """Per source: the newest row of its pending tables."""
        return {name: max(tables.values()) for name, tables in self.tables.items()}


@dataclass(frozen=True)
class BuildGroup(_PendingSources):
    """The part of a plan one dbt invocation builds: one dbt Cloud job's sources (Core: all)."""

    # the dbt Cloud job that runs it; None: the runner's default (always, on Core)
    job_id: int | None
    sources: list[SourceConfig]
    # per source, per pending table: its newest row when the plan was made
    tables: dict[str, dict[str, datetime]]
    selection: Selection


@dataclass(frozen=True)
class TransformPlan(_PendingSources):
    sources: list[SourceConfig]
    # per source, per pending table: its newest row when the plan was made, which a successful
    # build covers
    tables: dict[str, dict[str, datetime]]
    # per source: what its part of the build selects
    selections: dict[str, Selection]
    selection: Selection
    # what each dbt invocation builds, in order: one group per dbt Cloud job (Core: one)
    groups: list[BuildGroup]


def pending_tables(
    tables: dict[str, list[SourceTable]], watermarks: dict[tuple[str, str], Watermark]
) -> dict[str, list[SourceTable]]:
    """Per source with new rows: its tables with rows newer than the last build covered."""
    pending = {
        source: [t for t in source_tables if _mark(watermarks, t).pending]
        for source, source_tables in tables.items()
    }
    return {source: ts for source, ts in pending.items() if ts}


def source_selection(source: SourceConfig, pending: list[SourceTable]) -> Selection:
    """The dbt work a source's pending tables need: its configured selection, else what reads
    each pending table (a dbt source's tables), else ``source:<dbt_source>+``."""
    if source.selection is not None or not source.tables_from_dbt:
        return source.effective_selection
    return Selection(select=" ".join(t.downstream for t in pending))


def union_selection(
    selections: list[Selection], resolve_selector: Callable[[Selection], list[str]]
) -> Selection:
    """One dbt selection for several sources' work, so a burst costs one dbt invocation.

    ``--select`` takes a space-separated union; YAML selectors cannot be combined on the command
    line, so each is resolved to its model names (tests follow by dbt's eager indirect selection).
    """
    unique = list(dict.fromkeys(selections))
    if len(unique) == 1:
        return unique[0]
    parts: list[str] = []
    for selection in unique:
        if selection.selector is not None:
            parts.extend(resolve_selector(selection))
        elif selection.tag is not None:
            parts.append(f"tag:{selection.tag}")
        else:
            assert selection.select is not None
            parts.extend(selection.select.split())
    return Selection(select=" ".join(dict.fromkeys(parts)))


def plan_transform(
    pipeline: PipelineConfig,
    tables: dict[str, list[SourceTable]],
    watermarks: dict[tuple[str, str], Watermark],
    resolve_selector: Callable[[Selection], list[str]],
    *,
    only: Collection[str] | None = None,
    job_of: Callable[[SourceConfig], int | None] | None = None,
) -> TransformPlan | None:
    """The build covering every pending table, or None when nothing changed since the last one.

    ``only``: plan for these sources alone (the others stay pending for the next run).
    ``job_of``: the dbt Cloud job that builds a source; its groups are one per job, in the
    order of the sources. Without it (dbt Core), one group builds everything.
    """
    pending = pending_tables(tables, watermarks)
    sources = [
        s for s in pipeline.sources if s.name in pending and (only is None or s.name in only)
    ]
    if not sources:
        return None
    covered: dict[str, dict[str, datetime]] = {}
    for s in sources:
        covered[s.name] = {}
        for t in pending[s.name]:
            latest = _mark(watermarks, t).latest_loaded_at
            assert latest is not None  # pending means it has rows
            covered[s.name][t.table] = latest
    selections = {s.name: source_selection(s, pending[s.name]) for s in sources}
    by_job: dict[int | None, list[SourceConfig]] = {}
    for s in sources:
        by_job.setdefault(job_of(s) if job_of is not None else None, []).append(s)
    groups = [
        BuildGroup(
            job_id=job,
            sources=members,
            tables={s.name: covered[s.name] for s in members},
            selection=union_selection([selections[s.name] for s in members], resolve_selector),
        )
        for job, members in by_job.items()
    ]
    selection = (
        groups[0].selection
        if len(groups) == 1
        else union_selection([g.selection for g in groups], resolve_selector)
    )
    return TransformPlan(sources, covered, selections, selection, groups)


def _mark(watermarks: dict[tuple[str, str], Watermark], table: SourceTable) -> Watermark:
    return watermarks.get(table.key, Watermark(None, None))
