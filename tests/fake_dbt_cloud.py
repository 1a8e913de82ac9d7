"""A stateful fake of the dbt Cloud v2 Administrative API at the HTTP layer (respx).

It follows the documented shapes (docs.getdbt.com API v2; Airflow's dbt Cloud hook; data-mie's
dbt-cloud-cli), and refuses what dbt Cloud is not documented to accept:

* auth: ``Authorization: Token <key>`` only; anything else is a 401;
* every JSON answer but an artifact is the ``{"status": {...}, "data": ...}`` envelope; failures
  carry ``status.user_message``; a 429 carries ``Retry-After``;
* runs: ``status`` 1 queued, 2 starting, 3 running, 10 success, 20 error, 30 cancelled (plus
  ``status_humanized``, ``is_complete``/``is_success``/``is_error``/``is_cancelled``/
  ``in_progress``, ``href``, ``job_definition_id``). A run advances one entry of its script on
  each ``GET …/runs/{id}/``;
* ``include_related`` is one parameter holding a JSON list (``include_related=["trigger"]``, as
  the dbt docs write it); another form is a 400. ``trigger`` adds the run's trigger (its
  ``cause`` and ``steps_override``), ``run_steps`` its steps, each with a 1-based ``index``, a
  ``name`` like ``Invoke dbt with `dbt build …` `` and its own ``status``;
* a run's steps: clone, profile, ``dbt deps``, then the job's own steps before its commands (e.g.
  ``dbt source freshness``), the commands (``steps_override``, else the job's ``dbt build``), and
  the job's steps after them (e.g. ``dbt docs generate``). An errored run lists the steps up to
  the one that failed;
* artifacts: ``GET …/runs/{id}/artifacts/run_results.json?step=N`` is that step's, served raw;
  without ``step``, the last step's; a 404 while the run is not complete or when the step wrote
  none;
* ``POST …/jobs/{id}/rerun/`` acts on the job's latest run: from its failure (one ``dbt retry``
  step) when it errored, else a new run of the job's own steps;
* ``POST …/runs/{id}/cancel/`` cancels a run that is not complete (status 30).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import respx

from tests.conftest import suite_secret

ACCOUNT = 123
DEFAULT_JOB = 42
SOURCE_JOB = 77
OTHER_JOB = 78
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
INCLUDE_RELATED = {
    "trigger",
    "job",
    "environment",
    "repository",
    "run_steps",
    "run_retries",
    "debug_logs",
}
SETUP_STEPS = ["Clone git repository", "Create profile from deployment credentials"]


def ok(data: Any, extra: dict | None = None, code: int = 200) -> httpx.Response:
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


def err(code: int, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {
        "status": {
            "code": code,
            "is_success": False,
            "user_message": message,
            "developer_message": "",
        },
        "data": None,
    }
    return httpx.Response(code, json=body, headers=headers)


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

    jobs: set[int] = field(default_factory=lambda: {DEFAULT_JOB, SOURCE_JOB, OTHER_JOB})
    api_key: str = API_KEY
    # the statuses successive GET /runs/{id}/ return (the last one repeats), per kind of run
    script: list[int] = field(default_factory=lambda: [1, 3, 10])
    rerun_script: list[int] = field(default_factory=lambda: [1, 3, 10])
    # per job: the statuses of its triggered runs, when they differ from `script`
    job_scripts: dict[int, list[int]] = field(default_factory=dict)
    # run_results.json of a triggered run's command step (None: it writes none)
    artifact: dict[str, Any] | None = field(
        default_factory=lambda: run_results(node("model.shop.stg_events"))
    )
    job_artifacts: dict[int, dict[str, Any]] = field(default_factory=dict)
    # run_results.json of a rerun's `dbt retry` step
    rerun_artifact: dict[str, Any] | None = None
    # run_results.json of the job's own steps, by command (e.g. "dbt docs generate")
    step_artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the job's own steps kept around steps_override (job settings such as "run source
    # freshness" before and "generate docs" after)
    steps_before: dict[int, list[str]] = field(default_factory=dict)
    steps_after: dict[int, list[str]] = field(default_factory=dict)
    status_message: str | None = None
    # planned trigger failures, consumed in order: "429" (with Retry-After), "500" (nothing
    # created), "500-lost" (the run IS created, the answer is a 500), "drop-lost" (created,
    # connection drops)
    trigger_failures: list[str] = field(default_factory=list)
    retry_after: str = "30"
    # planned /rerun/ failures, the same kinds
    rerun_failures: list[str] = field(default_factory=list)
    # fail the next N GET /runs/{id}/ with 503
    poll_failures: int = 0
    # adversarial, NOT dbt Cloud behaviour: echo the Authorization header in error messages
    echo_auth: bool = False

    trigger_attempts: int = 0
    trigger_bodies: list[dict[str, Any]] = field(default_factory=list)
    triggered_jobs: list[int] = field(default_factory=list)
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    triggers: dict[int, dict[str, Any]] = field(default_factory=dict)
    steps: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    polls: dict[int, int] = field(default_factory=dict)
    list_calls: list[dict[str, str]] = field(default_factory=list)
    rerun_calls: list[int] = field(default_factory=list)
    cancel_calls: list[int] = field(default_factory=list)
    artifact_requests: list[tuple[int, int | None]] = field(default_factory=list)
    next_id: int = 9000
    _kinds: dict[int, str] = field(default_factory=dict)

    def install(self, router: respx.MockRouter) -> None:
        base = dict(scheme="https", host=HOST)
        router.post(**base, path__regex=rf"^{PREFIX}/jobs/(?P<job>\d+)/run/$").mock(
            side_effect=self._trigger
        )
        router.post(**base, path__regex=rf"^{PREFIX}/jobs/(?P<job>\d+)/rerun/$").mock(
            side_effect=self._rerun
        )
        router.get(**base, path__regex=rf"^{PREFIX}/runs/$").mock(side_effect=self._list_runs)
        router.get(**base, path__regex=rf"^{PREFIX}/runs/(?P<run>\d+)/$").mock(
            side_effect=self._get_run
        )
        router.post(**base, path__regex=rf"^{PREFIX}/runs/(?P<run>\d+)/cancel/$").mock(
            side_effect=self._cancel
        )
        router.get(
            **base, path__regex=rf"^{PREFIX}/runs/(?P<run>\d+)/artifacts/(?P<path>.+)$"
        ).mock(side_effect=self._artifact)

    # -- endpoints

    def _refuse(self, request: httpx.Request) -> httpx.Response | None:
        header = request.headers.get("authorization", "")
        if header != f"Token {self.api_key}":
            detail = f" (got {header!r})" if self.echo_auth else ""
            return err(401, f"Invalid token.{detail}")
        raw = request.url.params.get_list("include_related")
        if raw:
            try:
                related = json.loads(raw[0]) if len(raw) == 1 else None
            except ValueError:
                related = None
            if not (
                isinstance(related, list)
                and all(isinstance(r, str) and r in INCLUDE_RELATED for r in related)
            ):
                return err(400, f"include_related must be a JSON list of {sorted(INCLUDE_RELATED)}")
        return None

    def _failure(self, planned: list[str], request: httpx.Request) -> str | httpx.Response | None:
        failure = planned.pop(0) if planned else None
        if failure == "429":
            return err(429, "Too many requests", headers={"Retry-After": self.retry_after})
        if failure == "500":
            return err(500, "Internal server error")
        return failure

    def _trigger(self, request: httpx.Request, job: str) -> httpx.Response:
        if refused := self._refuse(request):
            return refused
        self.trigger_attempts += 1
        body = json.loads(request.content)
        self.trigger_bodies.append(body)
        failure = self._failure(self.trigger_failures, request)
        if isinstance(failure, httpx.Response):
            return failure
        if int(job) not in self.jobs:
            return err(404, "The requested resource was not found.")
        run = self.create_run(int(job), body)
        return self._answer(run, failure, request)

    def _rerun(self, request: httpx.Request, job: str) -> httpx.Response:
        if refused := self._refuse(request):
            return refused
        self.rerun_calls.append(int(job))
        failure = self._failure(self.rerun_failures, request)
        if isinstance(failure, httpx.Response):
            return failure
        if int(job) not in self.jobs:
            return err(404, "The requested resource was not found.")
        latest = max(
            (r for r in self.runs.values() if r["job_definition_id"] == int(job)),
            key=lambda r: r["id"],
            default=None,
        )
        if latest is not None and latest["status"] == 20:
            run = self.create_run(
                int(job), {"cause": f"Rerun of run {latest['id']} from failure"}, rerun=True
            )
        else:
            run = self.create_run(int(job), {"cause": "Rerun"})
        return self._answer(run, failure, request)

    def _answer(
        self, run: dict[str, Any], failure: str | None, request: httpx.Request
    ) -> httpx.Response:
        if failure == "500-lost":
            return err(500, "Internal server error")
        if failure == "drop-lost":
            raise httpx.ReadError("connection reset by peer", request=request)
        return ok(self._public(run))

    def _get_run(self, request: httpx.Request, run: str) -> httpx.Response:
        if refused := self._refuse(request):
            return refused
        if self.poll_failures:
            self.poll_failures -= 1
            return err(503, "Service unavailable")
        rid = int(run)
        if rid not in self.runs:
            return err(404, "The requested resource was not found.")
        self.advance(rid)
        return ok(self._public(self.runs[rid], request))

    def _cancel(self, request: httpx.Request, run: str) -> httpx.Response:
        if refused := self._refuse(request):
            return refused
        rid = int(run)
        if rid not in self.runs:
            return err(404, "The requested resource was not found.")
        self.cancel_calls.append(rid)
        if not self.runs[rid]["is_complete"]:
            self._kinds[rid] = "cancelled"
            self._set_status(rid, 30)
        return ok(self._public(self.runs[rid]))

    def _list_runs(self, request: httpx.Request) -> httpx.Response:
        if refused := self._refuse(request):
            return refused
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
        return ok(
            [self._public(r, request) for r in runs],
            extra={
                "filters": {"limit": limit, "offset": 0},
                "order_by": order,
                "pagination": {"count": len(runs), "total_count": total},
            },
        )

    def _artifact(self, request: httpx.Request, run: str, path: str) -> httpx.Response:
        if refused := self._refuse(request):
            return refused
        rid = int(run)
        step = request.url.params.get("step")
        self.artifact_requests.append((rid, int(step) if step else None))
        missing = err(404, "The requested resource was not found.")
        if rid not in self.runs or path != "run_results.json" or not self.runs[rid]["is_complete"]:
            return missing
        steps = self.steps[rid]
        if not steps:
            return missing
        chosen = steps[int(step) - 1] if step else steps[-1]
        if step and not 1 <= int(step) <= len(steps):
            return missing
        artifact = chosen.get("_artifact")
        if artifact is None:
            return missing
        return httpx.Response(200, json=artifact)  # artifacts are served raw, no envelope

    # -- state

    def create_run(self, job: int, body: dict[str, Any], *, rerun: bool = False) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        self.triggered_jobs.append(job)
        self._kinds[rid] = "rerun" if rerun else "run"
        self.triggers[rid] = {
            "id": rid + 500,
            "cause": body.get("cause"),
            "job_definition_id": job,
            "steps_override": body.get("steps_override"),
            "schema_override": body.get("schema_override"),
        }
        own = ["dbt retry"] if rerun else (body.get("steps_override") or ["dbt build"])
        before = [] if rerun else self.steps_before.get(job, [])
        after = self.steps_after.get(job, [])
        build_artifact = (
            self.rerun_artifact if rerun else self.job_artifacts.get(job, self.artifact)
        )
        self.steps[rid] = [{"name": name, "_artifact": None} for name in SETUP_STEPS]
        for kind, commands in (("job", ["dbt deps", *before]), ("own", own), ("job", after)):
            for command in commands:
                self.steps[rid].append(
                    {
                        "name": f"Invoke dbt with `{command}`",
                        "_artifact": build_artifact
                        if kind == "own"
                        else self.step_artifacts.get(command),
                    }
                )
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
        self.runs[rid] = run
        self._set_status(rid, 1)
        return run

    def advance(self, rid: int) -> None:
        n = self.polls.get(rid, 0)
        self.polls[rid] = n + 1
        if self._kinds[rid] == "cancelled":
            return
        job = self.runs[rid]["job_definition_id"]
        script = (
            self.rerun_script
            if self._kinds[rid] == "rerun"
            else self.job_scripts.get(job, self.script)
        )
        self._set_status(rid, script[min(n, len(script) - 1)])

    def _set_status(self, rid: int, status: int) -> None:
        self.runs[rid].update(
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

    def _run_steps(self, rid: int) -> list[dict[str, Any]]:
        """The run's steps as dbt Cloud lists them: an errored run's stop at the failed one."""
        status = self.runs[rid]["status"]
        steps = self.steps[rid]
        if status == 20:
            failing = max(
                (
                    i
                    for i, s in enumerate(steps)
                    if s["_artifact"] is not None
                    and any(
                        r.get("status") in ("error", "fail")
                        for r in s["_artifact"].get("results", [])
                    )
                ),
                default=len(steps) - 1,
            )
            steps = steps[: failing + 1]
        out = []
        for index, step in enumerate(steps, start=1):
            last = index == len(steps)
            step_status = (
                20 if status == 20 and last else (status if status in (1, 2, 3, 30) else 10)
            )
            out.append(
                {
                    "id": rid * 100 + index,
                    "run_id": rid,
                    "account_id": ACCOUNT,
                    "index": index,
                    "name": step["name"],
                    "status": step_status,
                    "status_humanized": STATUS_NAMES[step_status],
                    "logs": "",
                }
            )
        return out

    def _public(self, run: dict[str, Any], request: httpx.Request | None = None) -> dict[str, Any]:
        out = dict(run)
        raw = request.url.params.get("include_related") if request else None
        related = json.loads(raw) if raw else []
        if "trigger" in related:
            out["trigger"] = dict(self.triggers[run["id"]])
        if "run_steps" in related:
            out["run_steps"] = self._run_steps(run["id"])
        return out


class FakeClock:
    """``sleep`` advances ``now``; nothing waits for real. ``on_sleep`` may raise (a Prefect
    cancel or timeout arriving while the runner waits)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: Any = None

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))

    def __call__(self) -> float:
        return self.now
