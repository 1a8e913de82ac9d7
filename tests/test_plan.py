from __future__ import annotations

from datetime import datetime, timedelta

from postload.config import PipelineConfig, Selection
from postload.plan import pending_sources, plan_transform, union_selection
from postload.warehouse import Watermark

PIPELINE = PipelineConfig.model_validate(
    {
        "sources": [
            {
                "name": "customers",
                "raw_table": "customers",
                "stage": "customers",
                "selection": {"selector": "customers_pipeline"},
            },
            {"name": "orders", "raw_table": "orders", "stage": "orders"},
            {
                "name": "events",
                "raw_table": "events",
                "stage": "events",
                "selection": {"tag": "events"},
            },
        ]
    }
)
T0 = datetime(2026, 1, 1, 12, 0)


def resolve(selection: Selection) -> list[str]:
    return {"customers_pipeline": ["stg_customers", "customer_orders", "fct_orders"]}[
        selection.selector
    ]


def test_pending_means_loaded_after_the_last_covered_load() -> None:
    marks = {
        "customers": Watermark(T0, T0),  # built since
        "orders": Watermark(T0 + timedelta(seconds=1), T0),  # new rows
        "events": Watermark(None, None),  # never loaded
    }
    assert [s.name for s in pending_sources(PIPELINE, marks)] == ["orders"]
    assert Watermark(T0, None).pending


def test_nothing_pending_plans_nothing() -> None:
    marks = {name: Watermark(T0, T0) for name in PIPELINE.source_names}
    assert plan_transform(PIPELINE, marks, resolve) is None


def test_burst_of_sources_is_one_selection_with_the_union() -> None:
    marks = {name: Watermark(T0, None) for name in PIPELINE.source_names}
    plan = plan_transform(PIPELINE, marks, resolve)
    assert plan is not None
    assert plan.source_names == ["customers", "orders", "events"]
    assert plan.covers == {"customers": T0, "orders": T0, "events": T0}
    assert plan.selection.cli_args() == [
        "--select",
        "stg_customers customer_orders fct_orders source:orders+ tag:events",
    ]


def test_single_selection_is_kept_as_is() -> None:
    only = Selection(selector="customers_pipeline")
    assert union_selection([only, only], resolve) is only
