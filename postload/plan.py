"""Decide what a sync-triggered transform must build: from the warehouse, never from the event.

Events (Fivetran ``sync_end`` webhooks, the load flow's own "loaded" events, the sweep schedule)
only wake the transform up. What it builds comes from each source's watermark: rows loaded after
the newest load a successful transform covered. So a redelivered webhook finds nothing pending,
a burst of syncs collapses into one build, a sync that changed nothing builds nothing, and a lost
webhook is caught by the next run or sweep — dbt's ``source_status:fresher+`` idea, kept in the
warehouse instead of in ``sources.json`` files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from postload.config import PipelineConfig, Selection, SourceConfig
from postload.warehouse import Watermark


@dataclass(frozen=True)
class TransformPlan:
    sources: list[SourceConfig]
    # each source's latest load when the plan was made: what a successful build will cover
    covers: dict[str, datetime]
    selection: Selection

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]


def pending_sources(
    pipeline: PipelineConfig, watermarks: dict[str, Watermark]
) -> list[SourceConfig]:
    return [s for s in pipeline.sources if watermarks.get(s.name, Watermark(None, None)).pending]


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
    watermarks: dict[str, Watermark],
    resolve_selector: Callable[[Selection], list[str]],
) -> TransformPlan | None:
    """The build covering every pending source, or None when nothing changed since the last one."""
    pending = pending_sources(pipeline, watermarks)
    if not pending:
        return None
    covers = {s.name: watermarks[s.name].latest_loaded_at for s in pending}
    selection = union_selection([s.effective_selection for s in pending], resolve_selector)
    return TransformPlan(pending, covers, selection)  # type: ignore[arg-type]
