"""CloudDbtRunner against a stateful fake of the dbt Cloud v2 Administrative API (respx).

The fake follows the documented shapes: every JSON answer is the ``{"status": {...}, "data": ...}``
envelope; runs carry ``id``, ``status`` (1 queued, 2 starting, 3 running, 10 success, 20 error,
30 cancelled), ``status_humanized``, ``href``, ``is_complete``/``is_success``/``is_error``/
``is_cancelled``/``in_progress``, ``job_definition_id``; the trigger's ``cause`` and
``steps_override`` live on the related ``trigger`` object (``include_related=['trigger']``);
artifacts are served raw. No test sleeps for real: sleep and clock are a fake clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import respx
from prefect_dbt.cloud import DbtCloudCredentials

from postload.config import Selection, Settings
from postload.dbt import DbtBuildError
from postload.dbt._cloud import (
    CloudDbtRunner,
    DbtCloudApiError,
    DbtCloudError,
    DbtCloudRunTimeoutError,
    DbtCloudUnavailableError,
    node_from_run_result,
)
from tests.conftest import suite_secret

ACCOUNT = 123
DEFAULT_JOB = 42
SOURCE_JOB = 77
API_KEY = suite_secret("dbt Cloud: API key", "dbtc_TOPSECRET_k3y_do_not_leak_5f1e")
HOST = "cloud.getdbt.com"
PREFIX = f"/api/v2/accounts/{ACCOUNT}"
STATUS_NAMES = {
    1: "Queued",
    2: "Starting",
    3: "Running",
    10: "Success",
    20: "Error",
    30: "Cancelled",
}
EVENTS = Selection(select="source:events+")


def _ok(data: Any, extra: dict | None = None, code: int = 200) -> httpx.Response:
    body: dict[str, Any] = {
        "status": {
            "code": code,
            "is_success": True,
            "user_message": "Success!",
            "developer_message": "",
        },
        "data": data,
    }
    if extra is not None:
        body["extra"] = extra
    return httpx.Response(code, json=body)


def _err(code: int, message: str) -> httpx.Response:
    body = {
        "status": {
            "code": code,
            "is_success": False,
            "user_message": message,
            "developer_message": "",
        },
        "data": None,
    }
    return httpx.Response(code, json=body)


def run_results(*results: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/run-results/v6.json"},
        "results": list(results),
        "elapsed_time": 3.2,
        "args": {"which": "build"},
    }


def node(
    unique_id: str, status: str = "success", message: str | None = None, rows: int | None = 5
) -> dict[str, Any]:
    return {
        "unique_id": unique_id,
        "status": status,
        "timing": [
            {
                "name": "compile",
                "started_at": "2025-01-02T03:04:00.000000Z",
                "completed_at": "2025-01-02T03:04:01.000000Z",
            },
            {
                "name": "execute",
                "started_at": "2025-01-02T03:04:01.500000Z",
                "completed_at": "2025-01-02T03:04:03.000000Z",
            },
        ],
        "thread_id": "Thread-1",
        "execution_time": 1.75,
        "adapter_response": {"_message": "OK", "code": "SUCCESS", "rows_affected": rows},
        "message": message,
        "failures": 1 if status in ("fail", "error") else 0,
    }


@dataclass
class FakeDbtCloud:
    """A small stateful dbt Cloud: jobs, triggers, runs that advance on each poll, artifacts."""

    jobs: set[int] = field(default_factory=lambda: {DEFAULT_JOB, SOURCE_JOB})
    api_key: str = API_KEY
    # the statuses successive GET /runs/{id}/ return (the last one repeats)
    script: list[int] = field(default_factory=lambda: [1, 3, 10])
    artifact: dict[str, Any] | None = field(
        default_factory=lambda: run_results(node("model.shop.stg_events"))
    )
    status_message: str | None = None
    # planned trigger failures, consumed in order: "429", "500" (nothing created),
    # "500-lost" (the run IS created, the answer is a 500), "drop-lost" (created, connection drops)
    trigger_failures: list[str] = field(default_factory=list)
    # fail the next N GET /runs/{id}/ with 503
    poll_failures: int = 0
    # adversarial, NOT dbt Cloud behaviour: echo the Authorization header in error messages
    echo_auth: bool = False

    trigger_attempts: int = 0
    trigger_bodies: list[dict[str, Any]] = field(default_factory=list)
    triggered_jobs: list[int] = field(default_factory=list)
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    triggers: dict[int, dict[str, Any]] = field(default_factory=dict)
    polls: dict[int, int] = field(default_factory=dict)
    list_calls: list[dict[str, str]] = field(default_factory=list)
    next_id: int = 9000

    def install(self, router: respx.MockRouter) -> None:
        base = dict(scheme="https", host=HOST)
        router.post(**base, path__regex=rf"^{PREFIX}/jobs/(?P<job>\d+)/run/$").mock(
            side_effect=self._trigger
        )
        router.get(**base, path__regex=rf"^{PREFIX}/runs/$").mock(side_effect=self._list_runs)
        router.get(**base, path__regex=rf"^{PREFIX}/runs/(?P<run>\d+)/$").mock(
            side_effect=self._get_run
        )
        router.get(
            **base, path__regex=rf"^{PREFIX}/runs/(?P<run>\d+)/artifacts/(?P<path>.+)$"
        ).mock(side_effect=self._artifact)

    # -- endpoints

    def _auth(self, request: httpx.Request) -> httpx.Response | None:
        header = request.headers.get("authorization", "")
        if header in (f"Bearer {self.api_key}", f"Token {self.api_key}"):
            return None
        detail = f" (got {header!r})" if self.echo_auth else ""
        return _err(401, f"Invalid token.{detail}")

    def _trigger(self, request: httpx.Request, job: str) -> httpx.Response:
        if denied := self._auth(request):
            return denied
        self.trigger_attempts += 1
        body = json.loads(request.content)
        self.trigger_bodies.append(body)
        failure = self.trigger_failures.pop(0) if self.trigger_failures else None
        if failure == "429":
            return _err(429, "Too many requests")
        if failure == "500":
            return _err(500, "Internal server error")
        if int(job) not in self.jobs:
            return _err(404, "The requested resource was not found.")
        run = self._create_run(int(job), body)
        if failure == "500-lost":
            return _err(500, "Internal server error")
        if failure == "drop-lost":
            raise httpx.ReadError("connection reset by peer", request=request)
        return _ok(self._public(run))

    def _get_run(self, request: httpx.Request, run: str) -> httpx.Response:
        if denied := self._auth(request):
            return denied
        if self.poll_failures:
            self.poll_failures -= 1
            return _err(503, "Service unavailable")
        rid = int(run)
        if rid not in self.runs:
            return _err(404, "The requested resource was not found.")
        n = self.polls.get(rid, 0)
        self.polls[rid] = n + 1
        self._set_status(self.runs[rid], self.script[min(n, len(self.script) - 1)])
        return _ok(self._public(self.runs[rid], request))

    def _list_runs(self, request: httpx.Request) -> httpx.Response:
        if denied := self._auth(request):
            return denied
        q = dict(request.url.params)
        self.list_calls.append(q)
        runs = list(self.runs.values())
        if "job_definition_id" in q:
            runs = [r for r in runs if r["job_definition_id"] == int(q["job_definition_id"])]
        order = q.get("order_by", "id")
        runs.sort(key=lambda r: r["id"], reverse=order.startswith("-"))
        total = len(runs)
        limit = int(q.get("limit", 100))
        runs = runs[:limit]
        return _ok(
            [self._public(r, request) for r in runs],
            extra={
                "filters": {"limit": limit, "offset": 0},
                "order_by": order,
                "pagination": {"count": len(runs), "total_count": total},
            },
        )

    def _artifact(self, request: httpx.Request, run: str, path: str) -> httpx.Response:
        if denied := self._auth(request):
            return denied
        rid = int(run)
        if rid not in self.runs or path != "run_results.json" or self.artifact is None:
            return _err(404, "The requested resource was not found.")
        if not self.runs[rid]["is_complete"]:
            return _err(404, "The requested resource was not found.")
        return httpx.Response(200, json=self.artifact)  # artifacts are served raw, no envelope

    # -- state

    def _create_run(self, job: int, body: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        self.triggered_jobs.append(job)
        self.triggers[rid] = {
            "id": rid + 500,
            "cause": body.get("cause"),
            "job_definition_id": job,
            "steps_override": body.get("steps_override"),
            "schema_override": body.get("schema_override"),
        }
        run = {
            "id": rid,
            "trigger_id": rid + 500,
            "account_id": ACCOUNT,
            "environment_id": 5,
            "project_id": 6,
            "job_definition_id": job,
            "job_id": job,
            "status_message": None,
            "git_branch": "main",
            "href": f"https://{HOST}/deploy/{ACCOUNT}/projects/6/runs/{rid}/",
        }
        self._set_status(run, 1)
        self.runs[rid] = run
        return run

    def _set_status(self, run: dict[str, Any], status: int) -> None:
        run.update(
            status=status,
            status_humanized=STATUS_NAMES[status],
            in_progress=status in (1, 2, 3),
            is_complete=status in (10, 20, 30),
            is_success=status == 10,
            is_error=status == 20,
            is_cancelled=status == 30,
            is_running=status == 3,
            status_message=self.status_message if status in (20, 30) else None,
        )

    def _public(self, run: dict[str, Any], request: httpx.Request | None = None) -> dict[str, Any]:
        out = dict(run)
        related = request.url.params.get("include_related", "") if request else ""
        if "trigger" in related:
            out["trigger"] = dict(self.triggers[run["id"]])
        return out


class FakeClock:
    """``sleep`` advances ``now``; nothing waits for real."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


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
    assert fake.polls[run_id] == 3  # 1 queued -> 3 running -> 10 success
    assert clock.sleeps == [10, 10]
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
    result = make_runner(clock).build(EVENTS, cause="c")

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


def test_rate_limited_trigger_is_retried_and_creates_one_run(fake, clock):
    fake.trigger_failures = ["429"]
    result = make_runner(clock).build(EVENTS, cause="c")

    assert fake.trigger_attempts == 2
    assert len(fake.runs) == 1
    assert fake.list_calls == []  # a 429 was not accepted: no need to look for a run
    assert result.status == "success"
    assert 5 <= clock.sleeps[0] <= 7.5  # base delay plus up to 50 % jitter
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
    other = fake._create_run(DEFAULT_JOB, {"cause": "scheduled run"})
    fake._set_status(other, 3)
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


def test_per_source_job_runs_as_is(fake, clock):
    result = make_runner(clock).build(EVENTS, cause="c", job_id=SOURCE_JOB)

    assert fake.triggered_jobs == [SOURCE_JOB]
    assert "steps_override" not in fake.trigger_bodies[0]
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
    )
    runner = CloudDbtRunner.from_settings(settings)
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
