"""The full-run decision: every tracked source fresh and loaded again since the last full build."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from postload.config import ConfigError, PipelineConfig, load_pipeline_config
from postload.freshness import TrackedSource, decide, tracked_sources
from postload.sources import source_tables
from postload.warehouse import Watermark

NOW = datetime(2026, 11, 26, 12, 0, 0)


def pipeline(tmp_path: Path, full_run: dict[str, Any] | None = {}) -> PipelineConfig:  # noqa: B006
    import yaml

    doc: dict[str, Any] = {
        "version": 1,
        "sources": [
            {"name": "customers", "raw_table": "customers", "stage": "customers"},
            {"name": "orders", "raw_table": "orders", "stage": "orders"},
        ],
    }
    if full_run is not None:
        doc["full_run"] = full_run
    path = tmp_path / "postload.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_pipeline_config(path)


def manifest(**sources: dict[str, Any]) -> dict[str, Any]:
    return {
        "sources": {
            f"source.p.{name}.{name}": {"source_name": name, "name": name, **node}
            for name, node in sources.items()
        }
    }


DBT_FRESHNESS = {
    "loaded_at_field": "_loaded_at",
    "freshness": {
        "warn_after": {"count": 12, "period": "hour"},
        "error_after": {"count": 24, "period": "hour"},
    },
}


def track(config: PipelineConfig, manifest: dict[str, Any]) -> list[TrackedSource]:
    return tracked_sources(config, manifest, source_tables(config, manifest))


def tracked(tmp_path: Path, full_run: dict[str, Any] | None = {}) -> list[TrackedSource]:  # noqa: B006
    return track(
        pipeline(tmp_path, full_run), manifest(customers=DBT_FRESHNESS, orders=DBT_FRESHNESS)
    )


def ago(hours: float) -> datetime:
    return NOW - timedelta(hours=hours)


def marks(**loaded_hours_ago: float | None) -> dict[tuple[str, str], Watermark]:
    return {
        (name, name): Watermark(None if h is None else ago(h), None)
        for name, h in loaded_hours_ago.items()
    }


def full(**pairs: tuple[float, float]) -> dict[tuple[str, str], Watermark]:
    """(loaded hours ago, covered by the last full build hours ago) per source."""
    return {(n, n): Watermark(ago(loaded), ago(cov)) for n, (loaded, cov) in pairs.items()}


def test_limits_default_to_the_dbt_freshness_block(tmp_path: Path) -> None:
    sources = tracked(tmp_path)
    assert [(s.name, s.stale_after, s.alert_after) for s in sources] == [
        ("customers", timedelta(hours=12), timedelta(hours=24)),
        ("orders", timedelta(hours=12), timedelta(hours=24)),
    ]


def test_pipeline_config_overrides_the_limits(tmp_path: Path) -> None:
    config = pipeline(
        tmp_path,
        {"sources": ["orders"], "stale_after": {"orders": "30m"}, "alert_after": {"orders": "2h"}},
    )
    (only,) = track(config, manifest(customers=DBT_FRESHNESS, orders=DBT_FRESHNESS))
    assert (only.name, only.stale_after, only.alert_after) == (
        "orders",
        timedelta(minutes=30),
        timedelta(hours=2),
    )


def test_all_fresh_and_new_data_runs(tmp_path: Path) -> None:
    decision = decide(tracked(tmp_path), marks(customers=1, orders=2), NOW)
    assert decision.run
    assert decision.covers == {
        "customers": ago(1).replace(tzinfo=UTC),
        "orders": ago(2).replace(tzinfo=UTC),
    }


def test_a_stale_source_blocks_and_is_named_with_its_age(tmp_path: Path) -> None:
    decision = decide(tracked(tmp_path), marks(customers=1, orders=13), NOW)
    assert not decision.run
    assert [s.name for s in decision.waiting_for] == ["orders"]
    assert "orders: STALE, last load 13.0 h ago (allowed 12.0 h)" in decision.reason
    assert decision.past_deadline == []


def test_a_never_loaded_source_blocks_and_is_past_its_deadline(tmp_path: Path) -> None:
    decision = decide(tracked(tmp_path), marks(customers=1, orders=None), NOW)
    assert not decision.run
    assert "orders: never loaded" in decision.reason
    assert [s.name for s in decision.past_deadline] == ["orders"]


def test_nothing_new_since_the_last_full_build_does_not_run(tmp_path: Path) -> None:
    decision = decide(
        tracked(tmp_path),
        full(customers=(1, 1), orders=(2, 2)),
        NOW,
    )
    assert not decision.run
    assert decision.reason.startswith("nothing new")


def test_one_source_loading_again_waits_for_the_others(tmp_path: Path) -> None:
    """A single sync never wakes a full build: transform-on-sync builds what it changed."""
    decision = decide(
        tracked(tmp_path),
        full(customers=(0.5, 1), orders=(2, 2)),
        NOW,
    )
    assert not decision.run
    assert decision.reason.startswith("waiting for a load of orders since the last full build")


def test_every_source_loading_again_is_a_new_generation(tmp_path: Path) -> None:
    decision = decide(
        tracked(tmp_path),
        full(customers=(0.5, 1), orders=(0.2, 2)),
        NOW,
    )
    assert decision.run


def test_min_interval_holds_the_full_build_back(tmp_path: Path) -> None:
    config = pipeline(tmp_path, {"min_interval": "6h"})
    sources = track(config, manifest(customers=DBT_FRESHNESS, orders=DBT_FRESHNESS))
    new = marks(customers=0.5, orders=0.2)
    held = decide(sources, new, NOW, limits=config.full_run, last_full_build_at=ago(2))
    assert not held.run and "full_run.min_interval is 6.0 h" in held.reason
    assert decide(sources, new, NOW, limits=config.full_run, last_full_build_at=ago(7)).run


def test_cron_allows_one_full_build_per_period(tmp_path: Path) -> None:
    config = pipeline(tmp_path, {"cron": "0 6 * * *"})  # NOW is 12:00 UTC
    sources = track(config, manifest(customers=DBT_FRESHNESS, orders=DBT_FRESHNESS))
    new = marks(customers=0.5, orders=0.2)
    since_tick = decide(sources, new, NOW, limits=config.full_run, last_full_build_at=ago(1))
    assert not since_tick.run and "already ran since 2026-11-26 06:00 UTC" in since_tick.reason
    before_tick = decide(sources, new, NOW, limits=config.full_run, last_full_build_at=ago(7))
    assert before_tick.run


def test_a_bad_cron_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"full_run.cron: 'every day' is not a cron expression"):
        pipeline(tmp_path, {"cron": "every day"})


def test_without_full_run_only_sources_with_freshness_are_watched(tmp_path: Path) -> None:
    """Full builds are opt-in; stale-source notices still need the sources' dbt freshness."""
    config = pipeline(tmp_path, None)
    assert config.full_run is None
    no_limit = {"loaded_at_field": "_loaded_at"}
    sources = track(config, manifest(customers=DBT_FRESHNESS, orders=no_limit))
    assert [s.name for s in sources] == ["customers"]


def test_a_bare_full_run_key_opts_in(tmp_path: Path) -> None:
    path = tmp_path / "postload.yaml"
    path.write_text("sources: [{name: a, raw_table: a, stage: a}]\nfull_run:\n")
    assert load_pipeline_config(path).full_run is not None


def test_tracked_source_missing_from_dbt_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no source named 'orders'.*dbt sources: customers"):
        track(pipeline(tmp_path), manifest(customers=DBT_FRESHNESS))


def test_dbt_source_without_loaded_at_field_is_a_config_error(tmp_path: Path) -> None:
    no_field = {"freshness": DBT_FRESHNESS["freshness"]}
    with pytest.raises(ConfigError, match="'orders' has no loaded_at_field"):
        track(pipeline(tmp_path), manifest(customers=DBT_FRESHNESS, orders=no_field))


def test_no_staleness_anywhere_is_a_config_error(tmp_path: Path) -> None:
    no_limit = {"loaded_at_field": "_loaded_at"}
    with pytest.raises(ConfigError, match=r"full_run.stale_after.orders"):
        track(pipeline(tmp_path), manifest(customers=DBT_FRESHNESS, orders=no_limit))


def test_unknown_tracked_source_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"full_run.sources.*'payments'.*customers, orders"):
        pipeline(tmp_path, {"sources": ["payments"]})


def test_bad_duration_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"full_run.stale_after.orders.*'soon'.*like '30m'"):
        pipeline(tmp_path, {"stale_after": {"orders": "soon"}})
