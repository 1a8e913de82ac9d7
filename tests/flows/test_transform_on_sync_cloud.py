"""transform-on-sync on dbt Cloud, through the real flow: per-source jobs, one run per job.

dbt Cloud is the only fake (``tests/fake_dbt_cloud.py``, at the HTTP layer); the Prefect server,
the DuckDB warehouse and the local parse of the dbt project are real.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import respx
import yaml

from flows.transform_on_sync import transform_on_sync
from postload.dbt import DbtBuildError
from tests.conftest import PostloadHome, land_and_load, sql
from tests.fake_dbt_cloud import (
    ACCOUNT,
    API_KEY,
    SOURCE_JOB,
    FakeDbtCloud,
    node,
    run_results,
)

EVENTS_JOB = SOURCE_JOB + 1


@pytest.fixture
def cloud(prefect_server: str, postload_home: PostloadHome, monkeypatch) -> Iterator[FakeDbtCloud]:
    from prefect_dbt.cloud import DbtCloudCredentials

    config = postload_home.root / "postload.yaml"
    pipeline = yaml.safe_load(config.read_text())
    jobs = {"customers": SOURCE_JOB, "orders": SOURCE_JOB, "events": EVENTS_JOB}
    for source in pipeline["sources"]:
        source["dbt_cloud_job_id"] = jobs[source["name"]]
    config.write_text(yaml.safe_dump(pipeline))
    for name, value in {
        "POSTLOAD_DBT_RUNNER": "cloud",
        "POSTLOAD_SYNC_DEBOUNCE_SECONDS": "0",
        "POSTLOAD_DBT_CLOUD_POLL_SECONDS": "0.01",
        "POSTLOAD_DBT_NODE_RETRIES": "0",
        "POSTLOAD_DBT_CLOUD_CREDENTIALS_BLOCK": "postload-dbt-cloud-flows-test",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("POSTLOAD_DBT_CLOUD_JOB_ID", raising=False)  # per-source jobs only
    DbtCloudCredentials(api_key=API_KEY, account_id=ACCOUNT).save(
        "postload-dbt-cloud-flows-test", overwrite=True
    )
    fake = FakeDbtCloud()
    with respx.mock(assert_all_called=False) as router:
        fake.install(router)
        router.route().pass_through()  # the Prefect API
        yield fake


def test_per_source_jobs_run_one_build_each_and_a_failed_one_leaves_only_its_sources_pending(
    postload_home: PostloadHome, cloud: FakeDbtCloud
) -> None:
    for source in ("customers", "orders", "events"):
        land_and_load(postload_home, source, 1)
    cloud.job_scripts[SOURCE_JOB] = [3, 20]
    cloud.job_artifacts[SOURCE_JOB] = run_results(
        node("model.postload_demo.stg_customers", status="error", message="boom", rows=None)
    )
    cloud.job_artifacts[EVENTS_JOB] = run_results(node("model.postload_demo.stg_events"))

    with pytest.raises(DbtBuildError, match="stg_customers"):
        transform_on_sync(reason="load")

    # one run per job, each running its group's selection in the job's own environment
    assert cloud.triggered_jobs == [SOURCE_JOB, EVENTS_JOB]
    steps = [body["steps_override"] for body in cloud.trigger_bodies]
    assert steps[1] == ["dbt build --selector events_pipeline"]
    (customers_and_orders,) = steps[0]
    assert customers_and_orders.startswith("dbt build --select ")
    assert {"stg_customers", "source:orders+"} <= set(customers_and_orders.split()[3:])
    recorded = {
        source: (status, cloud.runs[run_id]["job_definition_id"], cloud.runs[run_id]["href"] == url)
        for source, status, run_id, url in sql(
            postload_home,
            "select source, status, dbt_cloud_run_id, dbt_cloud_run_url from ops.transform_runs",
        )
    }  # each source's row links the dbt Cloud run that built it
    assert recorded == {
        "customers": ("error", SOURCE_JOB, True),
        "orders": ("error", SOURCE_JOB, True),
        "events": ("success", EVENTS_JOB, True),
    }

    # the next run builds the failed group's sources again, and only those
    cloud.job_scripts.pop(SOURCE_JOB)
    cloud.job_artifacts[SOURCE_JOB] = run_results(node("model.postload_demo.stg_customers"))
    again = transform_on_sync(reason="sweep")
    assert cloud.triggered_jobs == [SOURCE_JOB, EVENTS_JOB, SOURCE_JOB]
    assert [b["sources"] for b in again["builds"]] == [["customers", "orders"]]
    assert again["builds"][0]["status"] == "success"
