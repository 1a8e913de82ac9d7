"""Decide when the full dbt build runs: once per fresh generation of the tracked sources.

A *generation* is the set of loads that made every tracked source fresh. The full build runs when
every tracked source is fresh (its newest row is younger than its allowed staleness) **and** at
least one of them has loaded since the last successful full build covered it. Both facts come
from the warehouse (each source's ``max(loaded_at_field)`` and the full builds recorded in
``ops.transform_runs``), so any number of load events, sweeps and manual runs agree on the
answer, and a run that finds nothing to do says which sources it waits for and how stale each is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from postload.config import ConfigError, PipelineConfig, Selection, SourceConfig
from postload.warehouse import Watermark

# Everything in the project: `fqn:*` is dbt's "every node" selector, valid on the command line
# and in a dbt Cloud step alike.
FULL_BUILD = Selection(select="fqn:*")

_PERIODS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}


@dataclass(frozen=True)
class TrackedSource:
    config: SourceConfig
    stale_after: timedelta
    alert_after: timedelta | None

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class SourceFreshness:
    name: str
    latest_loaded_at: datetime | None
    age: timedelta | None
    stale_after: timedelta
    alert_after: timedelta | None
    # newest load the last successful full build covered
    full_build_covered: datetime | None

    @property
    def fresh(self) -> bool:
        return self.age is not None and self.age <= self.stale_after

    @property
    def past_deadline(self) -> bool:
        if self.alert_after is None:
            return False
        return self.age is None or self.age > self.alert_after

    @property
    def loaded_since_full_build(self) -> bool:
        return self.latest_loaded_at is not None and (
            self.full_build_covered is None or self.latest_loaded_at > self.full_build_covered
        )

    def describe(self) -> str:
        if self.age is None:
            return f"{self.name}: never loaded (allowed staleness {_fmt(self.stale_after)})"
        state = "fresh" if self.fresh else "STALE"
        return (
            f"{self.name}: {state}, last load {_fmt(self.age)} ago "
            f"(allowed {_fmt(self.stale_after)})"
        )


@dataclass(frozen=True)
class FullRunDecision:
    run: bool
    reason: str
    sources: list[SourceFreshness]

    @property
    def covers(self) -> dict[str, datetime]:
        return {s.name: s.latest_loaded_at for s in self.sources if s.latest_loaded_at}

    @property
    def waiting_for(self) -> list[SourceFreshness]:
        return [s for s in self.sources if not s.fresh]

    @property
    def past_deadline(self) -> list[SourceFreshness]:
        return [s for s in self.sources if s.past_deadline]


def tracked_sources(
    pipeline: PipelineConfig, manifest: dict[str, Any], config_path: Path | str = "postload.yaml"
) -> list[TrackedSource]:
    """The sources the full build waits for, with their staleness limits.

    Limits come from ``full_run`` in the pipeline config, else from the dbt source's ``freshness``
    block (``warn_after`` = allowed staleness, ``error_after`` = alert deadline). Raises
    ``ConfigError`` for a tracked source dbt does not know or that has no ``loaded_at_field``.
    """
    settings = pipeline.full_run
    names = settings.sources if settings.sources is not None else [s.name for s in pipeline.sources]
    dbt_sources: dict[str, dict[str, Any]] = {}
    for node in manifest.get("sources", {}).values():
        dbt_sources.setdefault(node["source_name"], node)
    tracked = []
    for name in names:
        source = pipeline.source(name)
        dbt_name = source.dbt_source or source.name
        node = dbt_sources.get(dbt_name)
        if node is None:
            raise ConfigError(
                f"{config_path}: full_run tracks source {name!r}, but the dbt project has no "
                f"source named {dbt_name!r} (dbt sources: {', '.join(sorted(dbt_sources)) or 'none'}); "
                "expected a `sources:` entry with that name, or set `dbt_source` on the source"
            )
        if not node.get("loaded_at_field"):
            raise ConfigError(
                f"{config_path}: full_run tracks source {name!r}, but dbt source {dbt_name!r} "
                "has no loaded_at_field, so its freshness cannot be measured; expected "
                f"`loaded_at_field: {source.loaded_at_field}` in its dbt source config"
            )
        freshness = node.get("freshness") or {}
        stale_after = settings.stale_after.get(name) or _dbt_period(freshness.get("warn_after"))
        if stale_after is None:
            raise ConfigError(
                f"{config_path}: full_run tracks source {name!r}, but neither "
                f"full_run.stale_after.{name} nor dbt's freshness.warn_after for source "
                f"{dbt_name!r} says how stale it may be; expected one of them "
                "(e.g. `stale_after: {" + name + ": 2h}`)"
            )
        alert_after = (
            settings.alert_after.get(name)
            if name in settings.alert_after
            else _dbt_period(freshness.get("error_after"))
        )
        tracked.append(TrackedSource(source, stale_after, alert_after))
    return tracked


def decide(
    tracked: list[TrackedSource],
    latest: dict[str, Watermark],
    full_builds: dict[str, Watermark],
    now: datetime,
) -> FullRunDecision:
    sources = []
    for t in tracked:
        loaded = latest.get(t.name, Watermark(None, None)).latest_loaded_at
        covered = full_builds.get(t.name, Watermark(None, None)).covered_loaded_at
        sources.append(
            SourceFreshness(
                name=t.name,
                latest_loaded_at=loaded,
                age=None if loaded is None else max(now - loaded, timedelta(0)),
                stale_after=t.stale_after,
                alert_after=t.alert_after,
                full_build_covered=covered,
            )
        )
    stale = [s for s in sources if not s.fresh]
    if stale:
        return FullRunDecision(
            False, "waiting for " + "; ".join(s.describe() for s in stale), sources
        )
    if not any(s.loaded_since_full_build for s in sources):
        return FullRunDecision(
            False,
            "nothing new: every tracked source is fresh, and the last full build already "
            "covered its newest load",
            sources,
        )
    new = [s.name for s in sources if s.loaded_since_full_build]
    return FullRunDecision(
        True, f"every tracked source is fresh; new data in {', '.join(new)}", sources
    )


def _dbt_period(spec: dict[str, Any] | None) -> timedelta | None:
    if not spec or spec.get("count") is None or spec.get("period") not in _PERIODS:
        return None
    return _PERIODS[spec["period"]] * int(spec["count"])


def _fmt(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
