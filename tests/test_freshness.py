"""The full-run decision: every tracked source fresh and something new since the last full build."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from postload.config import ConfigError, PipelineConfig, load_pipeline_config
from postload.freshness import TrackedSource, decide, tracked_sources
from postload.warehouse import Watermark

NOW = datetime(2026, 11, 26, 12, 0, 0)


def pipeline(tmp_path: Path, full_run: dict[str, Any] | None = None) -> PipelineConfig:
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
            f"source.p.{name}.{name}": {"source_name": name, **node}
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


def tracked(tmp_path: Path) -> list[TrackedSource]:
    return tracked_sources(
        pipeline(tmp_path), manifest(customers=DBT_FRESHNESS, orders=DBT_FRESHNESS)
    )


def marks(**loaded_hours_ago: float | None) -> dict[str, Watermark]:
    return {
        name: Watermark(None if h is None else NOW - timedelta(hours=h), None)
        for name, h in loaded_hours_ago.items()
    }


def covered(**covered_hours_ago: float) -> dict[str, Watermark]:
    return {n: Watermark(None, NOW - timedelta(hours=h)) for n, h in covered_hours_ago.items()}


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
    (only,) = tracked_sources(config, manifest(customers=DBT_FRESHNESS, orders=DBT_FRESHNESS))
    assert (only.name, only.stale_after, only.alert_after) == (
        "orders",
        timedelta(minutes=30),
        timedelta(hours=2),
    )


def test_all_fresh_and_new_data_runs(tmp_path: Path) -> None:
    decision = decide(tracked(tmp_path), marks(customers=1, orders=2), {}, NOW)
    assert decision.run
    assert decision.covers == {
        "customers": NOW - timedelta(hours=1),
        "orders": NOW - timedelta(hours=2),
    }


def test_a_stale_source_blocks_and_is_named_with_its_age(tmp_path: Path) -> None:
    decision = decide(tracked(tmp_path), marks(customers=1, orders=13), {}, NOW)
    assert not decision.run
    assert [s.name for s in decision.waiting_for] == ["orders"]
    assert "orders: STALE, last load 13.0 h ago (allowed 12.0 h)" in decision.reason
    assert decision.past_deadline == []


def test_a_never_loaded_source_blocks_and_is_past_its_deadline(tmp_path: Path) -> None:
    decision = decide(tracked(tmp_path), marks(customers=1, orders=None), {}, NOW)
    assert not decision.run
    assert "orders: never loaded" in decision.reason
    assert [s.name for s in decision.past_deadline] == ["orders"]


def test_nothing_new_since_the_last_full_build_does_not_run(tmp_path: Path) -> None:
    decision = decide(
        tracked(tmp_path), marks(customers=1, orders=2), covered(customers=1, orders=2), NOW
    )
    assert not decision.run
    assert decision.reason.startswith("nothing new")


def test_one_source_loading_again_is_a_new_generation(tmp_path: Path) -> None:
    decision = decide(
        tracked(tmp_path), marks(customers=0.5, orders=2), covered(customers=1, orders=2), NOW
    )
    assert decision.run
    assert "new data in customers" in decision.reason


def test_tracked_source_missing_from_dbt_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no source named 'orders'.*dbt sources: customers"):
        tracked_sources(pipeline(tmp_path), manifest(customers=DBT_FRESHNESS))


def test_dbt_source_without_loaded_at_field_is_a_config_error(tmp_path: Path) -> None:
    no_field = {"freshness": DBT_FRESHNESS["freshness"]}
    with pytest.raises(ConfigError, match="'orders' has no loaded_at_field"):
        tracked_sources(pipeline(tmp_path), manifest(customers=DBT_FRESHNESS, orders=no_field))


def test_no_staleness_anywhere_is_a_config_error(tmp_path: Path) -> None:
    no_limit = {"loaded_at_field": "_loaded_at"}
    with pytest.raises(ConfigError, match=r"full_run.stale_after.orders"):
        tracked_sources(pipeline(tmp_path), manifest(customers=DBT_FRESHNESS, orders=no_limit))


def test_unknown_tracked_source_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"full_run.sources.*'payments'.*customers, orders"):
        pipeline(tmp_path, {"sources": ["payments"]})


def test_bad_duration_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"full_run.stale_after.orders.*'soon'.*like '30m'"):
        pipeline(tmp_path, {"stale_after": {"orders": "soon"}})
