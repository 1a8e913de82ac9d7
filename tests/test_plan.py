"""The planner: which tables have rows no build covered, and the one selection that builds them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from postload.config import ConfigError, PipelineConfig, Selection
from postload.plan import pending_tables, plan_transform, union_selection
from postload.sources import source_tables
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
TABLES = source_tables(PIPELINE, None)
T0 = datetime(2026, 1, 1, 12, 0)


def resolve(selection: Selection) -> list[str]:
    return {"customers_pipeline": ["stg_customers", "customer_orders", "fct_orders"]}[
        selection.selector
    ]


def marks(**by_source: Watermark) -> dict[tuple[str, str], Watermark]:
    return {(name, name): mark for name, mark in by_source.items()}


def test_pending_means_loaded_after_the_last_covered_load() -> None:
    pending = pending_tables(
        TABLES,
        marks(
            customers=Watermark(T0, T0),  # built since
            orders=Watermark(T0 + timedelta(seconds=1), T0),  # new rows
            events=Watermark(None, None),  # never loaded
        ),
    )
    assert list(pending) == ["orders"]
    assert Watermark(T0, None).pending


def test_nothing_pending_plans_nothing() -> None:
    every = marks(**{name: Watermark(T0, T0) for name in PIPELINE.source_names})
    assert plan_transform(PIPELINE, TABLES, every, resolve) is None


def test_burst_of_sources_is_one_selection_with_the_union() -> None:
    every = marks(**{name: Watermark(T0, None) for name in PIPELINE.source_names})
    plan = plan_transform(PIPELINE, TABLES, every, resolve)
    assert plan is not None
    assert plan.source_names == ["customers", "orders", "events"]
    t0 = T0.replace(tzinfo=UTC)
    assert plan.covers == {"customers": t0, "orders": t0, "events": t0}
    assert plan.tables == {
        "customers": {"customers": t0},
        "orders": {"orders": t0},
        "events": {"events": t0},
    }
    assert plan.selection.cli_args() == [
        "--select",
        "stg_customers customer_orders fct_orders source:orders+ tag:events",
    ]


def test_core_builds_every_pending_source_in_one_group() -> None:
    every = marks(**{name: Watermark(T0, None) for name in PIPELINE.source_names})
    plan = plan_transform(PIPELINE, TABLES, every, resolve)
    assert plan is not None
    (group,) = plan.groups
    assert group.job_id is None
    assert group.source_names == plan.source_names
    assert group.selection == plan.selection
    assert group.covers == plan.covers and group.tables == plan.tables


def test_dbt_cloud_groups_pending_sources_by_job_each_with_its_own_selection() -> None:
    """Per-source jobs only (no default): one group per job, in source order."""
    jobs = {"customers": 77, "orders": 78, "events": 77}
    every = marks(**{name: Watermark(T0, None) for name in PIPELINE.source_names})
    plan = plan_transform(PIPELINE, TABLES, every, resolve, job_of=lambda s: jobs[s.name])
    assert plan is not None
    assert [(g.job_id, g.source_names) for g in plan.groups] == [
        (77, ["customers", "events"]),
        (78, ["orders"]),
    ]
    first, second = plan.groups
    assert first.selection.cli_args() == [
        "--select",
        "stg_customers customer_orders fct_orders tag:events",
    ]
    assert second.selection == Selection(select="source:orders+")
    t0 = T0.replace(tzinfo=UTC)
    # each group covers its own sources' tables, so each is recorded on its own
    assert first.tables == {"customers": {"customers": t0}, "events": {"events": t0}}
    assert second.covers == {"orders": t0}


def test_sources_without_a_job_of_their_own_share_the_default_jobs_group() -> None:
    default = 42
    own = {"orders": 78}
    pending = marks(orders=Watermark(T0, None), events=Watermark(T0, None))
    plan = plan_transform(
        PIPELINE, TABLES, pending, resolve, job_of=lambda s: own.get(s.name, default)
    )
    assert plan is not None
    assert [(g.job_id, g.source_names) for g in plan.groups] == [(78, ["orders"]), (42, ["events"])]


def test_only_plans_for_the_named_sources() -> None:
    every = marks(**{name: Watermark(T0, None) for name in PIPELINE.source_names})
    plan = plan_transform(PIPELINE, TABLES, every, resolve, only=["orders"])
    assert plan is not None and plan.source_names == ["orders"]
    assert (
        plan_transform(PIPELINE, TABLES, marks(orders=Watermark(T0, T0)), resolve, only=["orders"])
        is None
    )


def test_single_selection_is_kept_as_is() -> None:
    only = Selection(selector="customers_pipeline")
    assert union_selection([only, only], resolve) is only


# --- a source as the dbt project declares it: a Fivetran connector's schema, many tables ------

FIVETRAN = PipelineConfig.model_validate(
    {
        "sources": [
            {"name": "salesforce", "loader": {"type": "fivetran", "connector_id": "sf_conn"}},
            {
                "name": "stripe",
                "loader": {"type": "fivetran", "connector_id": "stripe_conn"},
                "selection": {"tag": "finance"},
            },
        ]
    }
)


def dbt_source(
    source: str, table: str, *, schema: str, loaded_at: str | None = "_fivetran_synced"
) -> dict:
    return {
        "unique_id": f"source.p.{source}.{table}",
        "source_name": source,
        "name": table,
        "database": "analytics_db",
        "schema": schema,
        "identifier": table,
        "loaded_at_field": loaded_at,
        "freshness": {"warn_after": {"count": 12, "period": "hour"}},
    }


MANIFEST = {
    "sources": {
        n["unique_id"]: n
        for n in [
            *(
                dbt_source("salesforce", t, schema="salesforce")
                for t in ("account", "opportunity", "user", "contact")
            ),
            *(dbt_source("stripe", t, schema="stripe") for t in ("charge", "customer")),
        ]
    }
}


def test_a_dbt_source_is_its_tables_where_dbt_says_they_are() -> None:
    tables = source_tables(FIVETRAN, MANIFEST)
    assert [t.table for t in tables["salesforce"]] == ["account", "contact", "opportunity", "user"]
    account = tables["salesforce"][0]
    assert account.relation == "analytics_db.salesforce.account"
    assert account.loaded_at_field == "_fivetran_synced"
    assert account.downstream == "source:salesforce.account+"


def test_a_sync_that_changed_two_tables_builds_what_reads_those_two() -> None:
    tables = source_tables(FIVETRAN, MANIFEST)
    synced = datetime(2026, 1, 1, 12, 5, tzinfo=UTC)
    watermarks = {t.key: Watermark(T0, T0) for ts in tables.values() for t in ts}
    watermarks[("salesforce", "account")] = Watermark(synced, T0)
    watermarks[("salesforce", "user")] = Watermark(synced, T0)
    plan = plan_transform(FIVETRAN, tables, watermarks, resolve)
    assert plan is not None
    assert plan.selection.cli_args() == [
        "--select",
        "source:salesforce.account+ source:salesforce.user+",
    ]
    assert plan.tables == {"salesforce": {"account": synced, "user": synced}}


def test_a_configured_selection_is_kept_for_any_changed_table() -> None:
    tables = source_tables(FIVETRAN, MANIFEST)
    watermarks = {("stripe", "charge"): Watermark(T0, None)}
    plan = plan_transform(FIVETRAN, tables, watermarks, resolve)
    assert plan is not None and plan.selection.cli_args() == ["--select", "tag:finance"]


def test_fivetran_aware_times_compare_with_postload_naive_utc_bookkeeping() -> None:
    """_fivetran_synced is TIMESTAMP_TZ (aware, any offset); what postload recorded is naive UTC."""
    covered = datetime(2026, 1, 1, 12, 0)  # naive UTC, as ops.transform_tables stores it
    same_instant = datetime(2026, 1, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    later = datetime(2026, 1, 1, 7, 0, 1, tzinfo=timezone(timedelta(hours=-5)))
    assert not Watermark(same_instant, covered).pending
    assert Watermark(later, covered).pending


def test_a_dbt_source_the_project_does_not_declare_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"dbt source 'salesforce'.*does not declare"):
        source_tables(FIVETRAN, {"sources": {}})


def test_a_table_without_loaded_at_field_is_a_config_error_naming_it() -> None:
    manifest = {
        "sources": {"s": dbt_source("salesforce", "account", schema="salesforce", loaded_at=None)}
    }
    with pytest.raises(ConfigError, match="table 'account' has no loaded_at_field"):
        source_tables(FIVETRAN, manifest)


def test_a_table_is_read_under_the_name_dbt_renders_for_it() -> None:
    """dbt's relation_name carries the adapter's quoting: a table called `order` still works."""
    only_salesforce = PipelineConfig.model_validate(
        {"sources": [FIVETRAN.sources[0].model_dump(exclude_unset=True)]}
    )
    node = dbt_source("salesforce", "order", schema="salesforce")
    node["relation_name"] = '"analytics_db"."salesforce"."order"'
    (table,) = source_tables(only_salesforce, {"sources": {"s": node}})["salesforce"]
    assert table.relation == '"analytics_db"."salesforce"."order"'
    node["relation_name"] = "salesforce.order; drop table ops.transform_runs"
    with pytest.raises(ConfigError, match="plain identifiers only"):
        source_tables(only_salesforce, {"sources": {"s": node}})
