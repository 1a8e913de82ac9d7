"""CloudDbtRunner against a stateful fake of the dbt Cloud v2 Administrative API (respx).

The fake (``tests/fake_dbt_cloud.py``) follows the documented shapes and refuses what dbt Cloud
is not documented to accept. No test sleeps for real: sleep and clock are a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest
import respx
from prefect.exceptions import TerminationSignal
from prefect.flow_engine import FlowRunTimeoutError
from prefect_dbt.cloud import DbtCloudCredentials

from postload.config import Selection, Settings
from postload.dbt import DbtBuildError
from postload.dbt._cloud import (
    CloudDbtRunner,
    DbtCloudApiError,
    DbtCloudError,
    DbtCloudRunTimeoutError,
    DbtCloudUnavailableError,
    include_related_param,
    node_from_run_result,
)
from tests.fake_dbt_cloud import (
    ACCOUNT,
    API_KEY,
    DEFAULT_JOB,
    SOURCE_JOB,
    FakeClock,
    FakeDbtCloud,
    node,
    run_results,
)

EVENTS = Selection(select="source:events+")


@pytest.fixture
def fake() -> Any:
    cloud = FakeDbtCloud()
    with respx.mock(assert_all_called=False) as router:
        cloud.install(router)
        yield cloud


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_runner(clock: FakeClock, **kwargs: Any) -> CloudDbtRunner:
    options: dict[str, Any] = {
        "job_id": DEFAULT_JOB,
        "max_wait_seconds": 600,
        "poll_seconds": 10,
        "retries": 3,
        "retry_backoff_seconds": 5,
        "retry_jitter_factor": 0.5,
        "sleep": clock.sleep,
        "clock": clock,
    }
    options.update(kwargs)
    credentials = DbtCloudCredentials(api_key=options.pop("api_key", API_KEY), account_id=ACCOUNT)
    return CloudDbtRunner(credentials, **options)


CAUSE_TOKEN = re.compile(r" \[postload:[0-9a-f]{8}\]$")


# ---------------------------------------------------------------------- 1. success


def test_success_triggers_default_job_with_steps_override_and_reads_nodes(fake, clock):
    fake.artifact = run_results(
        node("model.shop.stg_events", rows=120),
        node("test.shop.not_null_stg_events_id.a1b2c3d4e5", status="pass", rows=0),
        node("model.shop.events_daily", rows=7),
    )
    result = make_runner(clock).build(EVENTS, cause="source events loaded 3 files")

    assert fake.trigger_attempts == 1
    assert fake.triggered_jobs == [DEFAULT_JOB]
    body = fake.trigger_bodies[0]
    assert body["steps_override"] == ["dbt build --select source:events+"]
    assert body["cause"].startswith("source events loaded 3 files [postload:")
    assert CAUSE_TOKEN.search(body["cause"])

    (run_id,) = fake.runs
    assert fake.polls[run_id] >= 3  # 1 queued -> 3 running -> 10 success (then its steps)
    assert clock.sleeps == [10, 10]
    assert fake.rerun_calls == [] and fake.cancel_calls == []
    assert result.status == "success"
    assert result.run_id == run_id
    assert result.run_url == fake.runs[run_id]["href"]
    assert result.selection == "--select source:events+"
    assert result.message is None
    assert [n.name for n in result.nodes] == [
        "stg_events",
        "not_null_stg_events_id",
        "events_daily",
    ]
    first = result.nodes[0]
    assert first.unique_id == "model.shop.stg_events"
    assert first.resource_type == "model"
    assert first.status == "success"
    assert first.rows_affected == 120
    assert first.execution_time_s == 1.75
    assert (
        first.started_at is not None
        and first.started_at.isoformat() == "2025-01-02T03:04:01.500000"
    )
    assert (
        first.completed_at is not None and first.completed_at.isoformat() == "2025-01-02T03:04:03"
    )
    assert result.nodes[1].resource_type == "test"


def test_cause_is_cut_to_255_characters_keeping_the_token(fake, clock):
    make_runner(clock).build(EVENTS, cause="x" * 400)
    cause = fake.trigger_bodies[0]["cause"]
    assert len(cause) == 255
    assert CAUSE_TOKEN.search(cause)


# ---------------------------------------------------------------------- 2. error


def test_errored_run_returns_failed_nodes_without_raising(fake, clock):
    fake.script = [3, 20]
    fake.status_message = "Database Error in model events_daily"
    fake.artifact = run_results(
        node("model.shop.stg_events"),
        node("model.shop.events_daily", status="error", message="Division by zero", rows=None),
        node("test.shop.unique_events_daily_day.0123456789", status="skipped"),
    )
    result = make_runner(clock, reruns=0).build(EVENTS, cause="c")

    assert result.status == "error"
    assert [n.name for n in result.failed_nodes] == ["events_daily"]
    assert result.failed_nodes[0].message == "Division by zero"
    assert "Database Error in model events_daily" in (result.message or "")
    assert "events_daily (error: Division by zero)" in str(DbtBuildError(result))


def test_errored_run_without_artifact_reports_status_message(fake, clock):
    fake.script = [20]
    fake.status_message = "Job failed during git clone"
    fake.artifact = None
    result = make_runner(clock).build(EVENTS, cause="c")

    assert result.nodes == []
    assert result.status == "error"
    assert "Job failed during git clone" in (result.message or "")
    assert f"run {result.run_id} failed" in (result.message or "")


# ---------------------------------------------------------------------- 3. cancelled


def test_cancelled_run_is_not_success_and_says_cancelled(fake, clock):
    fake.script = [1, 30]
    result = make_runner(clock).build(EVENTS, cause="c")

    assert result.status != "success"
    assert result.status == "error"
    assert result.cancelled
    assert "cancelled" in (result.message or "")
    assert "cancelled" in str(DbtBuildError(result))


# ---------------------------------------------------------------------- 4. 429


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [
        ("30", 30, 30),  # the server's Retry-After, longer than the backoff: honoured
        ("1", 5, 7.5),  # shorter: the base delay plus up to 50 % jitter
        ("900", 300, 300),  # absurd: capped
    ],
)
def test_rate_limited_trigger_waits_for_retry_after_and_creates_one_run(
    fake, clock, retry_after, low, high
):
    fake.trigger_failures = ["429"]
    fake.retry_after = retry_after
    result = make_runner(clock).build(EVENTS, cause="c")

    assert fake.trigger_attempts == 2
    assert len(fake.runs) == 1
    assert fake.list_calls == []  # a 429 was not accepted: no need to look for a run
    assert result.status == "success"
    assert low <= clock.sleeps[0] <= high
    assert fake.trigger_bodies[0]["cause"] == fake.trigger_bodies[1]["cause"]


# ---------------------------------------------------------------------- 5. lost response


@pytest.mark.parametrize("failure", ["500-lost", "drop-lost"])
def test_lost_trigger_response_adopts_the_run_it_created(fake, clock, failure):
    fake.trigger_failures = [failure]
    result = make_runner(clock).build(EVENTS, cause="c")

    assert fake.trigger_attempts == 1
    assert len(fake.runs) == 1
    (run_id,) = fake.runs
    assert result.run_id == run_id
    assert result.status == "success"
    (listing,) = fake.list_calls
    assert listing["job_definition_id"] == str(DEFAULT_JOB)
    assert listing["order_by"] == "-id"


def test_500_that_created_nothing_is_retried_after_checking(fake, clock):
    fake.trigger_failures = ["500"]
    result = make_runner(clock).build(EVENTS, cause="c")

    assert fake.trigger_attempts == 2
    assert len(fake.runs) == 1
    assert len(fake.list_calls) == 1
    assert result.status == "success"


def test_lost_response_does_not_adopt_someone_elses_run(fake, clock):
    other = fake.create_run(DEFAULT_JOB, {"cause": "scheduled run"})
    fake.trigger_failures = ["500"]
    result = make_runner(clock).build(EVENTS, cause="c")

    assert result.run_id != other["id"]
    assert len(fake.runs) == 2


def test_trigger_giving_up_says_a_run_may_exist(fake, clock):
    fake.trigger_failures = ["500"] * 10
    runner = make_runner(clock, retries=2)
    with pytest.raises(DbtCloudUnavailableError) as err:
        runner.build(EVENTS, cause="c")

    assert fake.trigger_attempts == 3
    assert err.value.run_may_exist
    assert "may still have been created" in str(err.value)
    assert "HTTP 500" in str(err.value)
    assert len(clock.sleeps) == 2
    assert clock.sleeps[1] >= 2 * 5  # exponential


# ---------------------------------------------------------------------- 6. per-source job


def test_per_source_job_runs_the_selection_with_steps_override(fake, clock):
    result = make_runner(clock).build(EVENTS, cause="c", job_id=SOURCE_JOB)

    assert fake.triggered_jobs == [SOURCE_JOB]
    # the job supplies environment, target and settings; postload supplies what to build
    assert fake.trigger_bodies[0]["steps_override"] == ["dbt build --select source:events+"]
    assert result.selection == "--select source:events+"
    assert result.status == "success"


def test_per_source_job_without_default(fake, clock):
    result = make_runner(clock, job_id=None).build(EVENTS, cause="c", job_id=SOURCE_JOB)
    assert fake.triggered_jobs == [SOURCE_JOB]
    assert result.status == "success"


def test_no_job_at_all_is_a_clear_error(fake, clock):
    with pytest.raises(ValueError, match="POSTLOAD_DBT_CLOUD_JOB_ID") as err:
        make_runner(clock, job_id=None).build(EVENTS, cause="c")
    assert "dbt_cloud_job_id" in str(err.value)
    assert fake.trigger_attempts == 0


def test_unknown_job_is_not_retried(fake, clock):
    with pytest.raises(DbtCloudApiError) as err:
        make_runner(clock).build(EVENTS, cause="c", job_id=999)
    assert err.value.status_code == 404
    assert fake.trigger_attempts == 1
    assert "job 999" in str(err.value)


# ---------------------------------------------------------------------- 7. timeout


def test_run_stuck_in_queue_times_out_without_retrigger(fake, clock):
    fake.script = [1]
    runner = make_runner(clock, max_wait_seconds=60, poll_seconds=10)
    with pytest.raises(TimeoutError) as err:
        runner.build(EVENTS, cause="c")

    (run_id,) = fake.runs
    assert isinstance(err.value, DbtCloudRunTimeoutError)
    assert err.value.run_id == run_id
    assert err.value.run_url == fake.runs[run_id]["href"]
    text = str(err.value)
    assert str(run_id) in text
    assert fake.runs[run_id]["href"] in text
    assert "NOT cancelled" in text and "re-triggered" in text
    assert fake.trigger_attempts == 1
    assert sum(clock.sleeps) == pytest.approx(60)


def test_transient_poll_failures_are_retried(fake, clock):
    fake.poll_failures = 2
    result = make_runner(clock).build(EVENTS, cause="c")
    assert result.status == "success"
    assert fake.trigger_attempts == 1


def test_poll_giving_up_names_the_run_and_does_not_retrigger(fake, clock):
    fake.poll_failures = 100
    with pytest.raises(DbtCloudUnavailableError) as err:
        make_runner(clock, retries=1).build(EVENTS, cause="c")
    (run_id,) = fake.runs
    assert err.value.run_id == run_id
    assert "NOT cancelled" in str(err.value)
    assert fake.trigger_attempts == 1


# ---------------------------------------------------------------------- 8. the API key


def test_api_key_never_leaks(fake, clock, caplog):
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    # a wrong key, with a (hypothetical, adversarial) server echoing the Authorization header
    fake.echo_auth = True
    wrong = "dbtc_OTHER_S3CRET_also_never_printed"
    with pytest.raises(DbtCloudApiError) as auth_err:
        make_runner(clock, api_key=wrong).build(EVENTS, cause="c")
    assert auth_err.value.status_code == 401
    texts += [str(auth_err.value), repr(auth_err.value)]
    assert wrong not in str(auth_err.value)
    assert "***" in str(auth_err.value)  # the echo was there, and scrubbed

    fake.trigger_failures = ["500"] * 10
    with pytest.raises(DbtCloudError) as down:
        make_runner(clock, retries=1).build(EVENTS, cause="c")
    texts += [str(down.value), repr(down.value)]

    fake.trigger_failures = []
    fake.script = [1]
    with pytest.raises(TimeoutError) as late:
        make_runner(clock, max_wait_seconds=20).build(EVENTS, cause="c")
    texts += [str(late.value), repr(late.value)]

    fake.script = [20]
    fake.artifact = None
    fake.status_message = "boom"
    runner = make_runner(clock)
    result = runner.build(EVENTS, cause="c")
    texts += [repr(result), str(result.message), repr(runner)]

    assert any("retry" in r.getMessage() for r in caplog.records)  # logs were captured
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert API_KEY not in text
        assert wrong not in text


# ---------------------------------------------------------------------- plumbing


def test_build_works_with_an_event_loop_running(fake, clock):
    """Sync ``build`` called from inside a running loop (an async flow calling sync code)."""

    async def main():
        return make_runner(clock).build(EVENTS, cause="c")

    assert asyncio.run(main()).status == "success"


def test_from_settings_loads_the_named_block(monkeypatch):
    loaded: list[str] = []

    def load(name: str, **_: Any) -> DbtCloudCredentials:
        loaded.append(name)
        return DbtCloudCredentials(api_key=API_KEY, account_id=ACCOUNT)

    monkeypatch.setattr(DbtCloudCredentials, "load", load)
    settings = Settings(
        dbt_cloud_credentials_block="my-dbt",
        dbt_cloud_job_id=DEFAULT_JOB,
        dbt_cloud_max_wait_seconds=99,
        dbt_cloud_poll_seconds=2.5,
        retries=4,
        retry_backoff_seconds=1.5,
        retry_jitter_factor=0.1,
        dbt_node_retries=2,
    )
    runner = CloudDbtRunner.from_settings(settings)
    assert runner.reruns == 2  # retries from failure: the same setting as Core's `dbt retry`
    assert loaded == ["my-dbt"]
    assert runner.kind == "cloud"
    assert (runner.job_id, runner.max_wait_seconds, runner.poll_seconds) == (DEFAULT_JOB, 99, 2.5)
    assert (runner.retries, runner.retry_backoff_seconds, runner.retry_jitter_factor) == (
        4,
        1.5,
        0.1,
    )


def test_from_settings_missing_block_is_clear(monkeypatch):
    def load(name: str, **_: Any) -> DbtCloudCredentials:
        raise ValueError(f"Unable to find block document named {name} for block type dbt-cloud")

    monkeypatch.setattr(DbtCloudCredentials, "load", load)
    with pytest.raises(DbtCloudError, match="POSTLOAD_DBT_CLOUD_CREDENTIALS_BLOCK"):
        CloudDbtRunner.from_settings(Settings(dbt_cloud_credentials_block="nope"))


@pytest.mark.parametrize(
    ("unique_id", "name", "kind"),
    [
        ("model.shop.stg_events", "stg_events", "model"),
        ("model.shop.dim_customers.v2", "dim_customers", "model"),
        ("test.shop.not_null_orders_id.cf6c17daed", "not_null_orders_id", "test"),
        ("test.shop.assert_positive_total", "assert_positive_total", "test"),
        ("unit_test.shop.stg_orders.test_dates", "test_dates", "unit_test"),
        ("seed.shop.countries", "countries", "seed"),
        ("snapshot.shop.orders_snapshot", "orders_snapshot", "snapshot"),
    ],
)
def test_node_names(unique_id, name, kind):
    result = node_from_run_result(node(unique_id))
    assert (result.name, result.resource_type) == (name, kind)


def test_node_timing_falls_back_to_compile():
    entry = node("model.shop.x")
    entry["timing"] = [t for t in entry["timing"] if t["name"] == "compile"]
    entry["adapter_response"] = {}
    result = node_from_run_result(entry)
    assert result.started_at is not None and result.started_at.isoformat() == "2025-01-02T03:04:00"
    assert result.rows_affected is None


# ---------------------------------------------------------------------- retry from failure

FAILED_BUILD = run_results(
    node("model.shop.stg_events"),
    node("model.shop.events_daily", status="error", message="Lock wait timeout", rows=None),
    node("test.shop.unique_events_daily_day.0123456789", status="skipped"),
)
RETRIED = run_results(
    node("model.shop.events_daily", rows=7),
    node("test.shop.unique_events_daily_day.0123456789", status="pass", rows=0),
)


def test_failed_run_is_retried_from_failure_once_never_retriggered(fake, clock):
    fake.script = [3, 20]
    fake.artifact = FAILED_BUILD
    fake.rerun_artifact = RETRIED
    result = make_runner(clock, reruns=1).build(EVENTS, cause="c")

    first, rerun = sorted(fake.runs)
    assert fake.trigger_attempts == 1  # never a second trigger
    assert fake.rerun_calls == [DEFAULT_JOB]  # exactly one /rerun/
    assert fake.triggers[rerun]["cause"] == f"Rerun of run {first} from failure"
    assert result.status == "success"
    assert (result.run_id, result.run_url) == (rerun, fake.runs[rerun]["href"])
    # the rerun's nodes replace the failed and skipped ones; what had succeeded stays
    assert {n.unique_id: n.status for n in result.nodes} == {
        "model.shop.stg_events": "success",
        "model.shop.events_daily": "success",
        "test.shop.unique_events_daily_day.0123456789": "pass",
    }
    assert result.retried == [
        ["model.shop.events_daily", "test.shop.unique_events_daily_day.0123456789"]
    ]
    assert f"retried from failure as run {rerun}" in (result.message or "")


def test_rerun_that_fails_again_stops_after_the_configured_reruns(fake, clock):
    fake.script = [20]
    fake.rerun_script = [20]
    fake.artifact = FAILED_BUILD
    fake.rerun_artifact = run_results(
        node("model.shop.events_daily", status="error", message="still locked", rows=None)
    )
    result = make_runner(clock, reruns=2).build(EVENTS, cause="c")

    assert fake.rerun_calls == [DEFAULT_JOB, DEFAULT_JOB]
    assert fake.trigger_attempts == 1
    assert result.status == "error"
    assert [n.message for n in result.failed_nodes] == ["still locked"]
    assert len(result.retried) == 2


def test_failed_data_tests_alone_are_not_retried(fake, clock):
    fake.script = [20]
    fake.artifact = run_results(
        node("model.shop.events_daily"),
        node("test.shop.accepted_values_x.0123456789", status="fail", message="Got 3 results"),
    )
    result = make_runner(clock, reruns=3).build(EVENTS, cause="c")

    assert fake.rerun_calls == []
    assert result.status == "error"
    assert [n.name for n in result.failed_nodes] == ["accepted_values_x"]


def test_no_rerun_when_the_jobs_latest_run_is_not_ours(fake, clock):
    """``/rerun/`` acts on the job's latest run: another run of the job meanwhile means no."""
    fake.script = [3, 20]
    fake.artifact = FAILED_BUILD
    clock.on_sleep = lambda n: fake.create_run(DEFAULT_JOB, {"cause": "Scheduled"})
    result = make_runner(clock, reruns=1).build(EVENTS, cause="c")

    ours, theirs = sorted(fake.runs)
    assert fake.rerun_calls == []
    assert result.status == "error" and result.run_id == ours
    assert f"latest run of job {DEFAULT_JOB} is now run {theirs}" in (result.message or "")


def test_rerun_whose_answer_was_lost_is_not_sent_again(fake, clock):
    fake.script = [20]
    fake.artifact = FAILED_BUILD
    fake.rerun_failures = ["500-lost"]  # dbt Cloud created the rerun, the answer is a 500
    result = make_runner(clock, reruns=1).build(EVENTS, cause="c")

    first, created = sorted(fake.runs)
    assert fake.rerun_calls == [DEFAULT_JOB]  # not a second /rerun/ (it would rerun the rerun)
    assert result.status == "error" and result.run_id == first
    assert f"is now run {created}" in (result.message or "")


def test_rerun_that_created_nothing_is_sent_again(fake, clock):
    fake.script = [20]
    fake.artifact = FAILED_BUILD
    fake.rerun_artifact = RETRIED
    fake.rerun_failures = ["500"]
    result = make_runner(clock, reruns=1).build(EVENTS, cause="c")

    assert fake.rerun_calls == [DEFAULT_JOB, DEFAULT_JOB]
    assert len(fake.runs) == 2
    assert result.status == "success"


# ---------------------------------------------------------------------- cancel


@pytest.mark.parametrize(
    "interruption",
    [TerminationSignal(signal=15), FlowRunTimeoutError("Scope timed out after 60 second(s).")],
    ids=["prefect-cancel", "flow-timeout"],
)
def test_interrupted_wait_cancels_the_run_and_reraises(fake, clock, caplog, interruption):
    fake.script = [1, 3]

    def interrupt(n: int) -> None:
        raise interruption

    clock.on_sleep = interrupt
    with pytest.raises(type(interruption)):
        make_runner(clock).build(EVENTS, cause="c")

    (run_id,) = fake.runs
    assert fake.cancel_calls == [run_id]
    assert fake.runs[run_id]["status"] == 30
    assert fake.trigger_attempts == 1 and fake.rerun_calls == []
    assert any(
        "cancelled" in r.getMessage() and fake.runs[run_id]["href"] in r.getMessage()
        for r in caplog.records
    )


def test_interrupted_rerun_wait_cancels_the_rerun(fake, clock):
    fake.script = [20]
    fake.rerun_script = [1, 3]
    fake.artifact = FAILED_BUILD

    def interrupt(n: int) -> None:
        raise TerminationSignal(signal=15)

    clock.on_sleep = interrupt
    with pytest.raises(TerminationSignal):
        make_runner(clock).build(EVENTS, cause="c")

    _first, rerun = sorted(fake.runs)
    assert fake.cancel_calls == [rerun]


def test_cancel_that_fails_is_logged_and_the_interruption_still_raised(fake, clock, caplog):
    fake.script = [1]

    def interrupt(n: int) -> None:
        fake.runs.clear()  # the cancel gets a 404
        raise TerminationSignal(signal=15)

    clock.on_sleep = interrupt
    with pytest.raises(TerminationSignal):
        make_runner(clock).build(EVENTS, cause="c")
    assert any("cancelling the run failed" in r.getMessage() for r in caplog.records)


def test_our_own_wait_limit_leaves_the_run_alone(fake, clock):
    fake.script = [1]
    with pytest.raises(DbtCloudRunTimeoutError):
        make_runner(clock, max_wait_seconds=30).build(EVENTS, cause="c")
    assert fake.cancel_calls == []


# ---------------------------------------------------------------------- steps, progress, API form


def test_every_dbt_node_step_is_read_and_merged(fake, clock):
    # the job's own steps stay around steps_override: a seed before, docs generation after
    fake.steps_before[DEFAULT_JOB] = ["dbt seed"]
    fake.steps_after[DEFAULT_JOB] = ["dbt docs generate"]
    fake.step_artifacts = {
        "dbt seed": run_results(node("seed.shop.countries", rows=250)),
        # docs generate lists compiled models: not build results
        "dbt docs generate": run_results(node("model.shop.only_compiled")),
    }
    fake.artifact = run_results(node("model.shop.stg_events"), node("model.shop.events_daily"))
    result = make_runner(clock).build(EVENTS, cause="c")

    (run_id,) = fake.runs
    # steps: 1 clone, 2 profile, 3 deps, 4 seed, 5 build, 6 docs generate
    assert sorted(step for rid, step in fake.artifact_requests if rid == run_id) == [4, 5]
    assert [n.unique_id for n in result.nodes] == [
        "seed.shop.countries",
        "model.shop.stg_events",
        "model.shop.events_daily",
    ]
    assert result.status == "success"


def test_a_line_per_poll_with_the_runs_link_and_status(fake, clock, caplog):
    caplog.set_level(logging.INFO)
    fake.script = [1, 2, 3, 3, 10]
    make_runner(clock).build(EVENTS, cause="c")

    (run_id,) = fake.runs
    href = fake.runs[run_id]["href"]
    lines = [r.getMessage() for r in caplog.records if href in r.getMessage()]
    progress = [line for line in lines if line.startswith(f"dbt Cloud run {run_id}: ")]
    assert [line.split(": ")[1].split(" after")[0] for line in progress] == [
        "Queued",
        "Starting",
        "Running",
        "Running",
        "Success",
    ]


def test_include_related_is_sent_as_the_documented_json_list(fake, clock):
    assert include_related_param(["trigger"]) == '["trigger"]'
    fake.trigger_failures = ["500-lost"]
    make_runner(clock).build(EVENTS, cause="c")
    (listing,) = fake.list_calls
    assert listing["include_related"] == '["trigger"]'


def test_the_fake_refuses_undocumented_forms():
    """The fake is strict, so the tests above prove the runner sends the documented forms."""
    import httpx

    cloud = FakeDbtCloud()
    base = f"https://cloud.getdbt.com/api/v2/accounts/{ACCOUNT}"
    with respx.mock(assert_all_called=False) as router:
        cloud.install(router)
        run = cloud.create_run(DEFAULT_JOB, {"cause": "x"})
        token = {"Authorization": f"Token {API_KEY}"}
        url = f"{base}/runs/{run['id']}/"
        assert httpx.get(url, headers=token).status_code == 200
        assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
        for form in ("['trigger']", "trigger"):
            got = httpx.get(url, headers=token, params={"include_related": form})
            assert got.status_code == 400, form
        got = httpx.get(url, headers=token, params={"include_related": '["trigger"]'})
        assert got.json()["data"]["trigger"]["cause"] == "x"


# ---------------------------------------------------------------------- parsing without credentials


def _cloud_settings(tmp_path, monkeypatch, warehouse: str) -> Settings:
    for name in ("DBT_PROFILES_DIR", "DBT_TARGET", "DBT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.dbt/profiles.yml to fall back on
    project = tmp_path / "shop"
    (project / "models").mkdir(parents=True)
    (project / "dbt_project.yml").write_text(
        'name: shop\nversion: "1.0.0"\nprofile: shop_prod\n'
        "flags:\n  send_anonymous_usage_stats: false\n"
    )
    (project / "models" / "sources.yml").write_text(
        "version: 2\nsources:\n  - name: shopify\n    schema: fivetran_shopify\n"
        "    tables: [{name: orders}]\n"
    )
    (project / "models" / "stg_orders.sql").write_text(
        "select * from {{ source('shopify', 'orders') }}\n"
    )
    return Settings(
        _env_file=None,
        project_dir=tmp_path,
        dbt_project_dir=project,
        dbt_runner="cloud",
        warehouse=warehouse,
    )


def test_cloud_mode_parses_a_snowflake_project_without_any_local_profile(tmp_path, monkeypatch):
    """No profiles.yml anywhere and no credentials: dbt Cloud builds, postload only parses."""
    import prefect_snowflake

    from postload.dbt import DbtProject

    class Block:
        database = "ANALYTICS"

    monkeypatch.setattr(prefect_snowflake.SnowflakeConnector, "load", lambda *a, **k: Block())
    settings = _cloud_settings(tmp_path, monkeypatch, "snowflake")
    project = DbtProject.from_settings(settings)
    manifest = project.manifest()

    assert manifest["metadata"]["adapter_type"] == "snowflake"
    (source,) = manifest["sources"].values()
    # the database sources default to is the warehouse's, as postload reads them back
    assert source["relation_name"] == "ANALYTICS.fivetran_shopify.orders"
    profile = (project.profiles_dir() / "profiles.yml").read_text()
    assert "shop_prod:" in profile and "postload_parse_only" in profile
    assert project.profiles_dir().is_relative_to(project.target_path)
    # written once: an unchanged profile does not make the next run parse again
    mtime = (project.profiles_dir() / "profiles.yml").stat().st_mtime_ns
    DbtProject.from_settings(settings)
    assert (project.profiles_dir() / "profiles.yml").stat().st_mtime_ns == mtime


def test_cloud_mode_parse_profile_on_duckdb_names_the_warehouse_file(tmp_path, monkeypatch):
    from postload.dbt._parse_profile import parse_profile

    settings = _cloud_settings(tmp_path, monkeypatch, "duckdb")
    monkeypatch.setenv("DBT_TARGET", "prod")
    profile = parse_profile(settings.dbt_project_path, settings)
    assert profile["shop_prod"] == {
        "target": "prod",
        "outputs": {
            "prod": {
                "type": "duckdb",
                "path": str(settings.duckdb_file),
                "schema": "postload_parse_only",
                "threads": 1,
            }
        },
    }


def test_doctor_in_cloud_mode_checks_jobs_not_a_local_profile():
    from postload.config import PipelineConfig
    from postload.doctor import Status, check_dbt_cloud

    pipeline = PipelineConfig.model_validate(
        {
            "sources": [
                {"name": "orders", "raw_table": "orders", "stage": "orders"},
                {"name": "events", "raw_table": "events", "stage": "events", "dbt_cloud_job_id": 7},
            ]
        }
    )
    settings = Settings(_env_file=None, dbt_runner="cloud")
    *_, jobs = check_dbt_cloud(settings, pipeline)
    assert jobs.status is Status.FAIL
    assert "orders" in jobs.message and "events" not in jobs.message
    assert "POSTLOAD_DBT_CLOUD_JOB_ID" in (jobs.fix or "")

    with_default = Settings(_env_file=None, dbt_runner="cloud", dbt_cloud_job_id=42)
    results = check_dbt_cloud(with_default, pipeline)
    assert [r.status for r in results] == [Status.OK, Status.SKIP, Status.SKIP, Status.OK]
    assert "job(s) 7, 42" in results[-1].message
