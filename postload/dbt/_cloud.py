"""dbt Cloud through prefect-dbt's ``DbtCloudCredentials`` and its administrative client.

One ``build`` = one triggered dbt Cloud run (plus its retries from failure), never two triggers:

* every run is triggered with ``steps_override=["dbt build <selection>"]``: the job (a source's
  ``dbt_cloud_job_id``, else the default ``POSTLOAD_DBT_CLOUD_JOB_ID``) supplies the environment,
  target, dbt version, threads and credentials; postload supplies what to build;
* the trigger's ``cause`` carries a unique token, so when a trigger's response is lost (5xx,
  dropped connection) the retry first lists the job's recent runs and adopts the one with our
  cause instead of starting a duplicate (the gotcha of prefect-dbt's own trigger task, #12953);
  a 429 was not accepted and is retried after its ``Retry-After``;
* the run is polled (a log line per poll with its link and status) until it is complete or
  ``max_wait_seconds`` passes; on that timeout the run is left alone and
  ``DbtCloudRunTimeoutError`` names it. When the *Prefect* run is cancelled (SIGTERM →
  ``TerminationSignal``), times out, or anything else interrupts the wait, the dbt Cloud run is
  cancelled (best effort) before the exception goes on;
* a run that errored on a model, seed or snapshot is retried from the failed node with the job's
  ``/rerun/`` endpoint (up to ``reruns`` times), only while the job's latest run is still ours:
  ``/rerun/`` acts on the job's latest run. The rerun's nodes replace the failed ones. A run
  whose only failures are data tests is not rerun (the same rule as Core's ``dbt retry``);
* every step that ran a dbt node command contributes its ``run_results.json``
  (``?step=N``), merged in step order. Model and test failures are results, not exceptions;
  only infrastructure failures (after retries) and timeouts raise.

The API key is only ever inside the prefect-dbt client's headers: no log line, exception or
result built here contains it (messages are scrubbed of it as a last line of defence).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect_dbt.cloud import DbtCloudCredentials
from prefect_dbt.cloud.models import TriggerJobRunOptions

from postload.config import Selection, Settings
from postload.dbt.results import DbtBuildResult, NodeResult, retryable

if TYPE_CHECKING:
    from prefect_dbt.cloud.clients import DbtCloudAdministrativeClient

__all__ = [
    "CloudDbtBuildResult",
    "CloudDbtRunner",
    "DbtCloudApiError",
    "DbtCloudError",
    "DbtCloudRunTimeoutError",
    "DbtCloudUnavailableError",
    "RunStatus",
    "node_from_run_result",
]

T = TypeVar("T")

CAUSE_MAX_LENGTH = 255
JOB_ID_ENV = "POSTLOAD_DBT_CLOUD_JOB_ID"
RUN_RESULTS = "run_results.json"
# How many of the job's most recent runs to search for one we may already have started.
ADOPT_SEARCH_LIMIT = 10
# A server's Retry-After is honoured, within reason.
MAX_RETRY_AFTER_SECONDS = 300.0
# Cancelling a run when the Prefect run goes away: one quick attempt (Prefect's own grace
# period after SIGTERM is short).
CANCEL_TIMEOUT_SECONDS = 10.0
# dbt commands whose run_results.json holds node results (`docs generate` and `compile` list
# every model as compiled, `source freshness` writes sources.json).
NODE_COMMANDS = frozenset({"build", "run", "test", "seed", "snapshot", "retry"})


class RunStatus(IntEnum):
    """dbt Cloud run status codes (v2 API)."""

    QUEUED = 1
    STARTING = 2
    RUNNING = 3
    SUCCESS = 10
    ERROR = 20
    CANCELLED = 30


TERMINAL_STATUSES = frozenset({RunStatus.SUCCESS, RunStatus.ERROR, RunStatus.CANCELLED})


class DbtCloudError(RuntimeError):
    """Talking to dbt Cloud failed (infrastructure, not models)."""


class DbtCloudApiError(DbtCloudError):
    """dbt Cloud refused a request (4xx other than 429, or a malformed answer): not retried."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class DbtCloudUnavailableError(DbtCloudError):
    """dbt Cloud kept failing transiently (429, 5xx, network) through every retry.

    Deliberately not a ``ConnectionError``: retrying ``build`` from outside (a task retry) would
    trigger a new run, and a run may already exist — while polling, it certainly does.
    ``run_may_exist`` is true when a trigger may have been accepted without us learning the run
    id (or the run id is known: the failure happened while waiting for it).
    """

    def __init__(
        self,
        message: str,
        *,
        run_may_exist: bool = False,
        run_id: int | None = None,
        run_url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.run_may_exist = run_may_exist or run_id is not None
        self.run_id = run_id
        self.run_url = run_url


class DbtCloudRunTimeoutError(TimeoutError):
    """The run did not finish within the maximum wait; it was NOT cancelled or re-triggered."""

    def __init__(self, message: str, *, run_id: int, run_url: str | None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.run_url = run_url


@dataclass(frozen=True)
class CloudDbtBuildResult(DbtBuildResult):
    """A ``DbtBuildResult`` that also knows the dbt Cloud run status.

    An errored run without failed nodes (the artifact was missing, or a non-dbt step failed) and
    a cancelled run both count as ``status == "error"``; ``message`` says which.
    """

    run_status: int | None = None

    @property
    def cancelled(self) -> bool:
        return self.run_status == RunStatus.CANCELLED

    @property
    def status(self) -> str:
        if self.run_status in (RunStatus.ERROR, RunStatus.CANCELLED):
            return "error"
        return super().status


@dataclass
class _Following:
    """The run a build is waiting for (the trigger's, then each rerun's), to cancel it."""

    run: dict[str, Any]
    status: int | None = None
    history: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.follow(self.run)

    def follow(self, run: dict[str, Any]) -> None:
        self.run, self.status = run, run.get("status")
        self.history.append(int(run["id"]))

    @property
    def run_id(self) -> int:
        return int(self.run["id"])

    @property
    def href(self) -> str | None:
        href = self.run.get("href")
        return str(href) if href else None


def _default_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger(__name__)


class CloudDbtRunner:
    """Runs a selection as a dbt Cloud job run and reads its per-node results back."""

    kind = "cloud"

    def __init__(
        self,
        credentials: DbtCloudCredentials,
        *,
        job_id: int | None = None,
        max_wait_seconds: float = 3600,
        poll_seconds: float = 10.0,
        retries: int = 3,
        retry_backoff_seconds: float = 5.0,
        retry_jitter_factor: float = 0.5,
        reruns: int = 1,
        cancel_timeout_seconds: float = CANCEL_TIMEOUT_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> None:
        """
        Args:
            credentials: prefect-dbt ``DbtCloudCredentials`` (api key, account id, domain).
            job_id: the default job, for builds that name no job of their own.
            max_wait_seconds: how long to wait for a run to finish before giving up on it.
            poll_seconds: how often to poll the run.
            retries: retries after the first attempt of each API call (transient failures only).
            retry_backoff_seconds: first retry delay; doubles on each further retry.
            retry_jitter_factor: up to this fraction of the delay is added at random.
            reruns: how many times an errored run is retried from failure (``/rerun/``).
            cancel_timeout_seconds: how long cancelling a run may take when the wait is
                interrupted (one attempt: the Prefect run is going away).
            sleep, clock: injectable for tests (no real waiting).
        """
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if reruns < 0:
            raise ValueError("reruns must be >= 0")
        self.credentials = credentials
        self.job_id = job_id
        self.max_wait_seconds = max_wait_seconds
        self.poll_seconds = poll_seconds
        self.retries = retries
        self.retry_backoff_seconds = retry_backoff_seconds
        self.retry_jitter_factor = retry_jitter_factor
        self.reruns = reruns
        self.cancel_timeout_seconds = cancel_timeout_seconds
        self._sleep = sleep
        self._clock = clock
        self._logger = logger

    def __repr__(self) -> str:
        return (
            f"CloudDbtRunner(account_id={self.credentials.account_id}, "
            f"domain={self.credentials.domain!r}, job_id={self.job_id})"
        )

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> CloudDbtRunner:
        """Load the ``DbtCloudCredentials`` block named by settings.dbt_cloud_credentials_block."""
        name = settings.dbt_cloud_credentials_block
        try:
            credentials = DbtCloudCredentials.load(name, _sync=True)
        except ValueError as exc:
            raise DbtCloudError(
                f"could not load the dbt Cloud credentials block {name!r} ({exc}); create a "
                f"DbtCloudCredentials block with that name, or point "
                f"POSTLOAD_DBT_CLOUD_CREDENTIALS_BLOCK at an existing one"
            ) from None
        kwargs: dict[str, Any] = {
            "job_id": settings.dbt_cloud_job_id,
            "max_wait_seconds": settings.dbt_cloud_max_wait_seconds,
            "poll_seconds": settings.dbt_cloud_poll_seconds,
            "retries": settings.retries,
            "retry_backoff_seconds": settings.retry_backoff_seconds,
            "retry_jitter_factor": settings.retry_jitter_factor,
            "reruns": settings.dbt_node_retries,
        }
        kwargs.update(overrides)
        return cls(credentials, **kwargs)

    # ------------------------------------------------------------------ the one public operation

    def build(
        self, selection: Selection, *, cause: str, job_id: int | None = None
    ) -> CloudDbtBuildResult:
        """Trigger one run of ``dbt build <selection>``, wait for it, and return its nodes.

        ``job_id`` (a source's job) or else the default job runs the build: the job supplies the
        environment and settings, ``steps_override`` the command. Raises ``ValueError`` when
        there is no job to run, ``DbtCloudApiError``/``DbtCloudUnavailableError`` for
        infrastructure failures and ``DbtCloudRunTimeoutError`` when the run outlives
        ``max_wait_seconds``. Any other exception while waiting (the Prefect run cancelled or
        timed out) cancels the dbt Cloud run, then propagates.
        """
        described = selection.describe()
        job = job_id if job_id is not None else self.job_id
        if job is None:
            raise ValueError(
                f"no dbt Cloud job to run for {described!r}: set {JOB_ID_ENV} (the default job) "
                "or 'dbt_cloud_job_id' in the pipeline config (on the source, or under "
                "'full_run:' for full builds); any job runs with steps_override "
                "'dbt build <selection>'"
            )
        steps_override = [f"dbt build {described}"]
        options = TriggerJobRunOptions(cause=unique_cause(cause), steps_override=steps_override)

        run = self._trigger(job, options)
        self._log().info(
            "dbt Cloud job %s: run %s triggered (%s) with steps_override %s",
            job,
            run["id"],
            run.get("href"),
            steps_override,
        )
        following = _Following(run)
        try:
            return self._follow(job, described, following)
        except DbtCloudRunTimeoutError:
            raise  # our own wait limit: the run is left to finish, as its message says
        except DbtCloudUnavailableError as exc:
            raise DbtCloudUnavailableError(
                f"{exc}; dbt Cloud run {following.run_id} ({following.href}) was NOT cancelled "
                "and will not be re-triggered — follow it in dbt Cloud",
                run_id=following.run_id,
                run_url=following.href,
            ) from None
        except DbtCloudError:
            raise
        except BaseException as exc:
            # The Prefect run is going away (TerminationSignal on cancel, FlowRunTimeoutError,
            # KeyboardInterrupt...): a dbt Cloud run nobody waits for must not keep building.
            self._cancel(following, exc)
            raise

    def _follow(self, job: int, described: str, following: _Following) -> CloudDbtBuildResult:
        finished = self._wait(following)
        result = self._result(described, finished)
        first_message = result.message
        nodes = list(result.nodes)
        retried: list[list[str]] = []
        notes: list[str] = []
        for attempt in range(1, self.reruns + 1):
            if result.run_status != RunStatus.ERROR or not retryable(nodes):
                break
            rerun, why_not = self._rerun(job, int(finished["id"]))
            if rerun is None:
                self._log().warning(
                    "dbt Cloud run %s not retried from failure: %s", finished["id"], why_not
                )
                notes.append(f"not retried from failure: {why_not}")
                break
            self._log().info(
                "dbt Cloud job %s: run %s failed; retrying it from the failed nodes as run %s "
                "(%s), retry %d/%d",
                job,
                finished["id"],
                rerun["id"],
                rerun.get("href"),
                attempt,
                self.reruns,
            )
            following.follow(rerun)
            finished = self._wait(following)
            result = self._result(described, finished)
            again = {n.unique_id: n for n in result.nodes}
            retried.append([uid for uid in again if not uid.startswith("operation.")])
            nodes = [again.pop(n.unique_id, n) for n in nodes] + list(again.values())
        if retried:
            runs = following.history
            notes.insert(
                0,
                f"{first_message or f'dbt Cloud run {runs[0]} failed'}; retried from failure as "
                + ", then ".join(f"run {r}" for r in runs[1:]),
            )
        message = "; ".join([m for m in (result.message, *notes) if m]) or None
        if not nodes and message is None:
            message = "the selection matched no dbt nodes"
        return CloudDbtBuildResult(
            selection=described,
            nodes=nodes,
            run_id=result.run_id,
            run_url=result.run_url,
            message=self._scrub(message) if message else None,
            run_status=result.run_status,
            retried=retried,
        )

    # ------------------------------------------------------------------ trigger (never twice)

    def _trigger(self, job_id: int, options: TriggerJobRunOptions) -> dict[str, Any]:
        attempts = self.retries + 1
        may_exist = False  # a trigger may have been accepted though we never saw its answer
        last = ""
        for attempt in range(1, attempts + 1):
            if may_exist:
                adopted = self._find_run(job_id, options.cause)
                if adopted is not None:
                    return adopted
            try:
                return _data(self._call(lambda c: c.trigger_job_run(job_id, options)), dict)
            except (httpx.HTTPStatusError, httpx.TransportError) as exc:
                what = f"triggering dbt Cloud job {job_id}"
                if not _is_transient(exc):
                    raise self._api_error(what, exc) from None
                may_exist = may_exist or _trigger_may_have_been_accepted(exc)
                last = self._describe(exc)
                if attempt < attempts:
                    self._backoff(what, attempt, attempts, exc)
        if may_exist:  # one last look before giving up: the run may be there after all
            adopted = self._find_run(job_id, options.cause)
            if adopted is not None:
                return adopted
        raise DbtCloudUnavailableError(
            self._scrub(
                f"triggering dbt Cloud job {job_id} failed {attempts} time(s) (last: {last})"
                + (
                    f"; a run with cause {options.cause!r} may still have been created — check "
                    "the job's runs before triggering it again"
                    if may_exist
                    else "; no run was created"
                )
            ),
            run_may_exist=may_exist,
        )

    def _find_run(self, job_id: int, cause: str) -> dict[str, Any] | None:
        """The job's recent run whose trigger cause is ours, if the lost trigger created one."""
        try:
            runs = self._job_runs(job_id, ADOPT_SEARCH_LIMIT, include_related=["trigger"])
        except DbtCloudError as exc:  # cannot check, so must not trigger again
            raise DbtCloudUnavailableError(
                self._scrub(
                    f"{exc}; a trigger of job {job_id} may have created a run with cause "
                    f"{cause!r} and it could not be checked, so it was not triggered again"
                ),
                run_may_exist=True,
            ) from None
        for run in runs:
            related = run.get("trigger")
            trigger: dict[str, Any] = related if isinstance(related, dict) else {}
            if cause in (trigger.get("cause"), run.get("cause")):
                self._log().warning(
                    "dbt Cloud job %s: a trigger's answer was lost but it created run %s; "
                    "adopting it instead of triggering again",
                    job_id,
                    run.get("id"),
                )
                return run
        return None

    def _job_runs(
        self, job_id: int, limit: int, *, include_related: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """The job's most recent runs, newest first."""
        params: dict[str, Any] = {"job_definition_id": job_id, "order_by": "-id", "limit": limit}
        if include_related:
            params["include_related"] = include_related_param(include_related)
        return _data(
            self._with_retries(
                f"listing the runs of dbt Cloud job {job_id}",
                lambda c: c.call_endpoint("GET", "/runs/", params=params),
            ),
            list,
        )

    # ------------------------------------------------------------------ retry from failure

    def _rerun(self, job_id: int, failed_run_id: int) -> tuple[dict[str, Any] | None, str]:
        """Retry the job's latest run from its failed nodes: (the new run, "") or (None, why not).

        ``/rerun/`` acts on whatever the job's latest run is — from the point of failure when it
        errored, else as a whole new run — so it is only called while that run is still ours.
        A POST that may have been accepted without us seeing the answer is only repeated when
        the job's latest run shows that it was not.
        """
        what = f"retrying dbt Cloud job {job_id} from failure"
        attempts = self.retries + 1
        try:
            for attempt in range(1, attempts + 1):
                latest = self._job_runs(job_id, 1)
                latest_id = int(latest[0]["id"]) if latest else None
                if latest_id != failed_run_id:
                    return None, (
                        f"the latest run of job {job_id} is now run {latest_id}"
                        + (f" ({latest[0].get('href')})" if latest else "")
                        + f", not the failed run {failed_run_id}, and /rerun/ would act on it"
                        + (" (it may be the rerun whose answer was lost)" if attempt > 1 else "")
                    )
                try:
                    return _data(
                        self._call(lambda c: c.call_endpoint("POST", f"/jobs/{job_id}/rerun/")),
                        dict,
                    ), ""
                except (httpx.HTTPStatusError, httpx.TransportError) as exc:
                    if not _is_transient(exc):
                        raise self._api_error(what, exc) from None
                    if attempt == attempts:
                        raise DbtCloudUnavailableError(
                            self._scrub(f"{what} failed {attempts} time(s): {self._describe(exc)}")
                        ) from None
                    self._backoff(what, attempt, attempts, exc)
        except DbtCloudError as exc:
            return None, str(exc)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ wait

    def _get_run(self, run_id: int, *, include_related: list[str] | None = None) -> dict[str, Any]:
        params = (
            {"include_related": include_related_param(include_related)} if include_related else None
        )
        return _data(
            self._with_retries(
                f"polling dbt Cloud run {run_id}",
                lambda c: c.call_endpoint("GET", f"/runs/{run_id}/", params=params),
            ),
            dict,
        )

    def _wait(self, following: _Following) -> dict[str, Any]:
        run_id = following.run_id
        started = self._clock()
        deadline = started + self.max_wait_seconds
        while True:
            run = self._get_run(run_id)
            following.status = run.get("status")
            status = run.get("status_humanized") or run.get("status")
            # a line per poll: the flow run's log shows the run is alive and where to watch it
            self._log().info(
                "dbt Cloud run %s: %s after %.0fs — %s",
                run_id,
                status,
                self._clock() - started,
                run.get("href") or following.href,
            )
            if run.get("status") in TERMINAL_STATUSES:
                return run
            remaining = deadline - self._clock()
            if remaining <= 0:
                href = run.get("href")
                raise DbtCloudRunTimeoutError(
                    f"dbt Cloud run {run_id} ({href}) did not finish within "
                    f"{self.max_wait_seconds:g}s (last status: {status}); it was NOT cancelled "
                    "and will not be re-triggered — follow it in dbt Cloud, or cancel it there",
                    run_id=run_id,
                    run_url=href,
                )
            self._sleep(min(self.poll_seconds, remaining))

    def _cancel(self, following: _Following, why: BaseException) -> None:
        """Cancel the followed run, once and quickly; never raises (the caller re-raises)."""
        if following.status in TERMINAL_STATUSES:
            return
        run_id, href = following.run_id, following.href
        reason = type(why).__name__
        try:
            self._call(
                lambda c: c.call_endpoint("POST", f"/runs/{run_id}/cancel/"),
                timeout=self.cancel_timeout_seconds,
            )
        except BaseException as exc:  # best effort: the original exception matters more
            self._log().error(
                "the wait for dbt Cloud run %s ended (%s) and cancelling the run failed (%s): "
                "cancel it in dbt Cloud — %s",
                run_id,
                reason,
                self._describe(exc) if isinstance(exc, Exception) else type(exc).__name__,
                href,
            )
            return
        self._log().warning(
            "the wait for dbt Cloud run %s ended (%s): the run was cancelled — %s",
            run_id,
            reason,
            href,
        )

    # ------------------------------------------------------------------ results

    def _result(self, selection: str, run: dict[str, Any]) -> CloudDbtBuildResult:
        run_id = int(run["id"])
        status = run.get("status")
        href = run.get("href")

        def result(nodes: list[NodeResult], message: str | None) -> CloudDbtBuildResult:
            return CloudDbtBuildResult(
                selection=selection,
                nodes=nodes,
                run_id=run_id,
                run_url=href,
                message=self._scrub(message) if message else None,
                run_status=status,
            )

        status_message = f": {run['status_message']}" if run.get("status_message") else ""
        if status == RunStatus.CANCELLED:
            return result([], f"dbt Cloud run {run_id} was cancelled{status_message}")

        nodes = self._nodes(run_id)
        if nodes is None:
            if status == RunStatus.ERROR:
                return result(
                    [],
                    f"dbt Cloud run {run_id} failed: "
                    f"{run.get('status_message') or 'no status message'} (no {RUN_RESULTS})",
                )
            return result([], f"dbt Cloud run {run_id} succeeded but left no {RUN_RESULTS}")
        if status == RunStatus.ERROR:
            return result(nodes, f"dbt Cloud run {run_id} failed{status_message}")
        return result(nodes, None)

    def _nodes(self, run_id: int) -> list[NodeResult] | None:
        """Every dbt node step's ``run_results.json``, merged in step order (None: none found).

        A job may run several dbt commands (its own steps around ``dbt build``, a rerun's
        ``dbt retry``): each step has its own artifact, and without ``?step=`` only the last
        step's is returned — which may be ``dbt docs generate``'s.
        """
        steps = self._get_run(run_id, include_related=["run_steps"]).get("run_steps") or []
        indexes = [int(s["index"]) for s in steps if _runs_dbt_nodes(s)]
        artifacts = (
            [self._run_results(run_id, step) for step in indexes]
            if indexes
            else [self._run_results(run_id, None)]  # no steps listed: the default, last step
        )
        found = [a for a in artifacts if a is not None]
        if not found:
            return None
        merged: dict[str, NodeResult] = {}
        for artifact in found:
            for entry in artifact.get("results") or []:
                node = node_from_run_result(entry)
                merged.pop(node.unique_id, None)  # a later step's result of a node wins
                merged[node.unique_id] = node
        return list(merged.values())

    def _run_results(self, run_id: int, step: int | None) -> dict[str, Any] | None:
        where = f"{RUN_RESULTS} of dbt Cloud run {run_id}" + (f" step {step}" if step else "")
        try:
            response = self._with_retries(
                f"fetching {where}",
                lambda c: c.get_run_artifact(run_id, RUN_RESULTS, step=step),
            )
        except DbtCloudApiError as exc:
            if exc.status_code == 404:
                return None
            raise
        try:
            body = response.json()
        except ValueError:
            raise DbtCloudApiError(f"{where} is not JSON") from None
        if not isinstance(body, dict):
            raise DbtCloudApiError(f"{where} is not an object")
        return body

    # ------------------------------------------------------------------ HTTP plumbing

    def _call(
        self,
        request: Callable[[DbtCloudAdministrativeClient], Awaitable[httpx.Response]],
        *,
        timeout: float | None = None,
    ) -> httpx.Response:
        """One request on a fresh prefect-dbt admin client, from sync code.

        ``run_coro_as_sync`` works with or without a running event loop (plain scripts, sync and
        async flows and tasks); a fresh client per call keeps it off any loop it was not made on.
        """

        async def go() -> httpx.Response:
            async with self.credentials.get_administrative_client() as client:
                _use_token_auth(client, self.credentials.api_key.get_secret_value())
                if timeout is None:
                    return await request(client)
                return await asyncio.wait_for(request(client), timeout)

        return run_coro_as_sync(go())

    def _with_retries(
        self,
        what: str,
        request: Callable[[DbtCloudAdministrativeClient], Awaitable[httpx.Response]],
    ) -> httpx.Response:
        """An idempotent request, retried on 429, 5xx and network errors."""
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._call(request)
            except (httpx.HTTPStatusError, httpx.TransportError) as exc:
                if not _is_transient(exc):
                    raise self._api_error(what, exc) from None
                if attempt == attempts:
                    raise DbtCloudUnavailableError(
                        self._scrub(
                            f"{what} failed {attempts} time(s) (last: {self._describe(exc)})"
                        )
                    ) from None
                self._backoff(what, attempt, attempts, exc)
        raise AssertionError("unreachable")

    def _backoff(self, what: str, attempt: int, attempts: int, exc: Exception) -> None:
        delay = self.retry_backoff_seconds * 2 ** (attempt - 1)
        delay += random.uniform(0, delay * self.retry_jitter_factor)
        retry_after = _retry_after(exc)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
        self._log().warning(
            "%s: %s; retry %d/%d in %.1fs",
            what,
            self._describe(exc),
            attempt,
            attempts - 1,
            delay,
        )
        self._sleep(delay)

    def _api_error(self, what: str, exc: Exception) -> DbtCloudApiError:
        code = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
        hint = ""
        if code in (401, 403):
            hint = (
                f"; check the API key and account id ({self.credentials.account_id}) in the "
                "DbtCloudCredentials block"
            )
        return DbtCloudApiError(
            self._scrub(f"{what} failed: {self._describe(exc)}{hint}"), status_code=code
        )

    def _describe(self, exc: Exception) -> str:
        if isinstance(exc, httpx.HTTPStatusError):
            request, response = exc.request, exc.response
            text = f"HTTP {response.status_code} from {request.method} {request.url.path}"
            detail = _user_message(response)
            return self._scrub(f"{text}: {detail}" if detail else text)
        return self._scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    def _scrub(self, text: str) -> str:
        key = self.credentials.api_key.get_secret_value()
        return text.replace(key, "***") if key else text

    def _log(self) -> logging.Logger | logging.LoggerAdapter:
        return self._logger or _default_logger()


# ---------------------------------------------------------------------- helpers


def unique_cause(cause: str) -> str:
    """The caller's cause, made unique to this trigger and cut to dbt Cloud's 255 characters."""
    suffix = f" [postload:{secrets.token_hex(4)}]"
    return cause[: CAUSE_MAX_LENGTH - len(suffix)] + suffix


def include_related_param(related: list[str]) -> str:
    """``include_related`` as dbt Cloud documents it: a JSON list in one query parameter,
    ``include_related=["trigger"]`` (docs.getdbt.com, "Migrating to dbt Cloud Administrative API
    v2": ``GET …/runs/?include_related=["trigger"]&order_by=-id``; dbt-cloud-cli's ``run get``
    sends ``json.dumps(list)`` too). Not Python's repr (``['trigger']``) and not a repeated
    parameter (what prefect-dbt's ``get_run(include_related=[...])`` would send)."""
    return json.dumps(related)


def _runs_dbt_nodes(step: dict[str, Any]) -> bool:
    """A run step that ran a dbt command with node results (its name is
    ``Invoke dbt with `dbt build --select …` ``) and got to run (not skipped or cancelled)."""
    name = str(step.get("name") or "")
    command = name.partition("`")[2].partition("`")[0]
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    ran = step.get("status") in (RunStatus.SUCCESS, RunStatus.ERROR)
    return ran and len(words) >= 2 and words[0] == "dbt" and words[1] in NODE_COMMANDS


def _use_token_auth(client: DbtCloudAdministrativeClient, api_key: str) -> None:
    """dbt Cloud documents ``Authorization: Token <key>`` (Airflow's hook sends it too);
    prefect-dbt's client sends ``Bearer``, which dbt Cloud is not documented to accept."""
    http = getattr(client, "_admin_client", None)
    if isinstance(http, httpx.AsyncClient):
        http.headers["Authorization"] = f"Token {api_key}"


def _data(response: httpx.Response, kind: type[T]) -> T:
    """The ``data`` of dbt Cloud's ``{"status": {...}, "data": ...}`` envelope."""
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        data = None
    if not isinstance(data, kind):
        raise DbtCloudApiError(
            f"unexpected answer from dbt Cloud to {response.request.method} "
            f"{response.request.url.path}: expected a {kind.__name__} in 'data'",
            status_code=response.status_code,
        )
    return data


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code == 429 or code >= 500
    return isinstance(exc, httpx.TransportError)


def _trigger_may_have_been_accepted(exc: Exception) -> bool:
    """False only when the trigger certainly did not create a run."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code != 429  # 429: rate limited, not accepted
    # never connected, so never sent
    return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _retry_after(exc: Exception) -> float | None:
    if not isinstance(exc, httpx.HTTPStatusError) or exc.response.status_code != 429:
        return None
    try:
        return max(0.0, float(exc.response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _user_message(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    status = body.get("status") if isinstance(body, dict) else None
    if isinstance(status, dict) and status.get("user_message"):
        return str(status["user_message"])[:300]
    return None


def node_from_run_result(result: dict[str, Any]) -> NodeResult:
    """One entry of ``run_results.json`` as a ``NodeResult``."""
    unique_id = str(result["unique_id"])
    timing = {t.get("name"): t for t in result.get("timing") or [] if isinstance(t, dict)}
    window = timing.get("execute") or timing.get("compile") or {}
    adapter = result.get("adapter_response") or {}
    rows = adapter.get("rows_affected") if isinstance(adapter, dict) else None
    execution_time = result.get("execution_time")
    return NodeResult(
        unique_id=unique_id,
        name=_node_name(unique_id),
        resource_type=unique_id.split(".", 1)[0],
        status=str(result.get("status")),
        started_at=_timestamp(window.get("started_at")),
        completed_at=_timestamp(window.get("completed_at")),
        execution_time_s=float(execution_time) if execution_time is not None else None,
        rows_affected=rows if isinstance(rows, int) and not isinstance(rows, bool) else None,
        message=result.get("message"),
    )


def _node_name(unique_id: str) -> str:
    """The last part of the unique id — except a generic test's hash or a model's version
    (``test.p.not_null_x.a1b2c3d4e5`` → ``not_null_x``, ``model.p.m.v2`` → ``m``), as dbt names
    those nodes."""
    parts = unique_id.split(".")
    if len(parts) == 4:
        kind, last = parts[0], parts[-1]
        hashed_test = (
            kind == "test" and len(last) == 10 and all(c in "0123456789abcdef" for c in last)
        )
        versioned = kind == "model" and last[:1] == "v" and last[1:].isdigit()
        if hashed_test or versioned:
            return parts[2]
    return parts[-1]


def _timestamp(value: Any) -> datetime | None:
    """An ISO timestamp from the artifact, as naive UTC (as the Core runner records them)."""
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed
