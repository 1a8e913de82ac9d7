"""Decide when the full dbt build runs: once per fresh generation of the tracked sources.

The full build is opt-in (``full_run:`` in postload.yaml) and serves the selective builds, never
replaces them. A *generation* is a set of loads in which every tracked source took part. The
full build runs when every tracked source has loaded since the last successful full build **and**
every one is fresh (its newest row is younger than its allowed staleness), and, when configured,
the last full build is at least ``min_interval`` old and none ran since the latest ``cron`` tick.
So one connector's sync never wakes a full build: transform-on-sync builds what it changed. Each
fact comes from the warehouse (each table's ``max(loaded_at_field)`` and the builds recorded in
``ops``), so any number of events, sweeps and manual runs agree on the answer, and a run that finds
nothing to do says which sources it waits for and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from postload.config import ConfigError, FullRunConfig, PipelineConfig, Selection, SourceConfig
from postload.sources import SourceTable
from postload.warehouse import Watermark, as_utc

# Everything in the project: `fqn:*` is dbt's "every node" selector, valid on the command line
# and in a dbt Cloud step alike.
FULL_BUILD = Selection(select="fqn:*")

_PERIODS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}


@dataclass(frozen=True)
class TrackedSource:
    config: SourceConfig
    stale_after: timedelta
    alert_after: timedelta | None
    tables: tuple[SourceTable, ...] = ()

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
    # some table has rows the last successful full build did not cover
    new_since_full_build: bool = False

    @property
    def fresh(self) -> bool:
        return self.age is not None and self.age <= self.stale_after

    @property
    def past_deadline(self) -> bool:
        if self.alert_after is None:
            return False
        return self.age is None or self.age > self.alert_after

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

    def off(self, reason: str) -> FullRunDecision:
        """The same measurements, with no build (full builds not configured)."""
        return FullRunDecision(False, reason, self.sources)


def tracked_sources(
    pipeline: PipelineConfig,
    manifest: dict[str, Any],
    tables: dict[str, list[SourceTable]],
    config_path: Path | str = "postload.yaml",
) -> list[TrackedSource]:
    """The sources the full build waits for, with their tables and staleness limits.

    Limits come from ``full_run`` in the pipeline config, else from the dbt source's ``freshness``
    block (``warn_after`` = allowed staleness, ``error_after`` = alert deadline; the strictest of
    its tables'). Raises ``ConfigError`` for a tracked source dbt does not know or that has no
    ``loaded_at_field``. ``tables``: each source's tables (``postload.sources.source_tables``).
    """
    settings = pipeline.full_run or FullRunConfig()
    # Without `full_run:` nothing is built, and only sources whose dbt freshness sets limits are
    # watched (for stale-source notices): a source without them is skipped, not an error.
    required = pipeline.full_run is not None
    names = settings.sources if settings.sources is not None else [s.name for s in pipeline.sources]
    dbt_sources: dict[str, list[dict[str, Any]]] = {}
    for node in manifest.get("sources", {}).values():
        dbt_sources.setdefault(node["source_name"], []).append(node)
    tracked = []
    for name in names:
        source = pipeline.source(name)
        dbt_name = source.dbt_source_name
        nodes = dbt_sources.get(dbt_name)
        if not nodes and not required:
            continue
        if not nodes:
            raise ConfigError(
                f"{config_path}: full_run tracks source {name!r}, but the dbt project has no "
                f"source named {dbt_name!r} (dbt sources: {', '.join(sorted(dbt_sources)) or 'none'}); "
                "expected a `sources:` entry with that name, or set `dbt_source` on the source"
            )
        if source.raw_table is not None:
            # postload.yaml names the table: the dbt source's entry for it, else its first
            nodes = [n for n in nodes if n["name"] == source.raw_table] or nodes[:1]
            if not nodes[0].get("loaded_at_field"):
                if not required:
                    continue
                raise ConfigError(
                    f"{config_path}: full_run tracks source {name!r}, but dbt source {dbt_name!r} "
                    "has no loaded_at_field, so its freshness cannot be measured; expected "
                    f"`loaded_at_field: {source.loaded_at_field}` in its dbt source config"
                )
        warn = [
            p for n in nodes if (p := _dbt_period((n.get("freshness") or {}).get("warn_after")))
        ]
        error = [
            p for n in nodes if (p := _dbt_period((n.get("freshness") or {}).get("error_after")))
        ]
        stale_after = settings.stale_after.get(name) or (min(warn) if warn else None)
        if stale_after is None and not required:
            continue
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
            else (min(error) if error else None)
        )
        tracked.append(TrackedSource(source, stale_after, alert_after, tuple(tables[name])))
    return tracked


def decide(
    tracked: list[TrackedSource],
    marks: dict[tuple[str, str], Watermark],
    now: datetime,
    *,
    limits: FullRunConfig | None = None,
    last_full_build_at: datetime | None = None,
) -> FullRunDecision:
    """Whether to build everything now. ``marks``: each table's watermark, its coverage counting
    full builds only (``watermarks(tables, selection=FULL_BUILD.describe())``);
    ``last_full_build_at``: when the last successful full build ended (for
    ``limits.min_interval`` and ``limits.cron``)."""
    now_utc = as_utc(now)
    assert now_utc is not None
    sources = []
    for t in tracked:
        # each table's newest row, and the newest the last full build covered
        own = [marks.get(table.key, _NONE) for table in t.tables]
        loaded = max((m.latest_loaded_at for m in own if m.latest_loaded_at), default=None)
        covered = max((m.covered_loaded_at for m in own if m.covered_loaded_at), default=None)
        sources.append(
            SourceFreshness(
                name=t.name,
                latest_loaded_at=loaded,
                age=None if loaded is None else max(now_utc - loaded, timedelta(0)),
                stale_after=t.stale_after,
                alert_after=t.alert_after,
                full_build_covered=covered,
                new_since_full_build=any(m.pending for m in own),
            )
        )
    stale = [s for s in sources if not s.fresh]
    if stale:
        return FullRunDecision(
            False, "waiting for " + "; ".join(s.describe() for s in stale), sources
        )
    if not any(s.new_since_full_build for s in sources):
        return FullRunDecision(
            False,
            "nothing new: every tracked source is fresh, and the last full build already "
            "covered its newest load",
            sources,
        )
    if not_yet := [s.name for s in sources if not s.new_since_full_build]:
        return FullRunDecision(
            False,
            "waiting for a load of "
            + ", ".join(not_yet)
            + " since the last full build (it builds once every tracked source has loaded; "
            "transform-on-sync builds each load's own models meanwhile)",
            sources,
        )
    if held := _held_back(limits, as_utc(last_full_build_at), now_utc):
        return FullRunDecision(False, held, sources)
    return FullRunDecision(
        True, "every tracked source is fresh and has loaded since the last full build", sources
    )


_NONE = Watermark(None, None)


def _held_back(limits: FullRunConfig | None, last: datetime | None, now: datetime) -> str | None:
    """Why ``min_interval`` or ``cron`` hold the full build back now, or None."""
    if limits is None or last is None:
        return None
    if limits.min_interval is not None and now - last < limits.min_interval:
        return (
            f"the last full build ended {_fmt(now - last)} ago; full_run.min_interval is "
            f"{_fmt(limits.min_interval)}"
        )
    if limits.cron is not None:
        from cronsim import CronSim

        tick = next(CronSim(limits.cron, now, reverse=True))
        if last >= tick:
            return (
                f"a full build already ran since {tick:%Y-%m-%d %H:%M} UTC "
                f"(full_run.cron {limits.cron!r}: at most one per period)"
            )
    return None


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
