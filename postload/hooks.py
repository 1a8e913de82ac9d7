"""What every postload flow declares in its ``@flow(...)``: its timeout and its state hooks.

* ``flow_timeout_seconds()``: ``Settings.flow_timeout_seconds``, read when the flow's module is
  imported. Both ways postload's deployments run read it there: a worker's ``prefect.engine``
  imports the entrypoint in the run's own process (with the job's environment), and
  ``postload serve`` imports the entrypoints and hands the flow objects to its runner.
* ``timed_out_as_timeout``: keeps a timed-out run ``TimedOut`` (see its docstring).
* ``on_failure`` (Failed and TimedOut runs, after retries): the one Slack message for the run,
  with the failed dbt nodes and their errors, through prefect-slack's ``SlackWebhook`` block.
* ``on_completion``: resolves the PagerDuty alerts of this deployment's runs that failed since
  its previous successful run.

Which path sends what is in postload.alerts.

What a flow timeout does to a hung dbt Core build (verified in tests/flows/test_timeouts.py):
Prefect raises into the flow's thread at the deadline (SIGALRM: deployments run a flow in its
process's main thread). dbt is waiting there for its node threads; the interrupt ends that wait,
dbt returns it as a failed invocation, and the run ends ``TimedOut`` at its deadline. The
``with`` blocks it leaves free the deployment's slot (the state is final) and the warehouse
writer slot (the file lock, or the global concurrency limit on Snowflake), and nothing is
recorded for the build, so the next run's plan (warehouse watermarks) finds its sources still
pending and builds them. The dbt node that hung is *not* stopped: it keeps running in a daemon
thread of dbt's pool until the run's process exits (a worker's or ``postload serve``'s run
process ends after the run, and Python does not wait for daemon threads at exit; that exit is
not exercised by the tests), and dbt cancels its
warehouse connections only on KeyboardInterrupt, so a query in flight on Snowflake runs on there
until it finishes or Snowflake's ``STATEMENT_TIMEOUT_IN_SECONDS`` ends it (set it below the flow
timeout). This is why the limit is a *flow* timeout: a task timeout would leave the same thread
running inside a live flow run that goes on, or retries, next to it (PrefectHQ/prefect#23161).
A flow run called in a thread other than the main one (not how deployments run) only gets the
interrupt when it next runs Python code, so a build blocked in dbt's wait would outlive it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from prefect.exceptions import MissingContextError
from pydantic import ValidationError

from postload.config import Settings

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.schemas.objects import FlowRun, State

    from postload.dbt.results import DbtBuildResult

P = ParamSpec("P")
R = TypeVar("R")

# prefect-slack's block (slug slack-incoming-webhook) the failure hook sends through; registered
# by `postload blocks register` from the same SLACK_WEBHOOK_URL as the automations' block.
SLACK_HOOK_BLOCK = "postload-slack-webhook"
# Slack renders at most ~40,000 characters of a message's text; the list of failed nodes is cut
# well before that.
MAX_NODES_LISTED = 20
MAX_NODE_MESSAGE_CHARS = 500
# A few attempts: the failure hook is the only sender of a Failed run's message.
SLACK_ATTEMPTS = 3


def flow_timeout_seconds() -> int | None:
    """The flows' timeout; ``None`` (no timeout) when set to 0."""
    try:
        seconds = Settings().flow_timeout_seconds
    except ValidationError:
        # Invalid settings fail the flow run itself, with the error; the import must not.
        seconds = Settings.model_fields["flow_timeout_seconds"].default
    return seconds or None


def timed_out_as_timeout(fn: Callable[P, R]) -> Callable[P, R]:
    """Re-raise a failure that ends a run past its timeout as ``TimeoutError``.

    Prefect ends a sync flow at its timeout by raising into the flow's thread (SIGALRM in the
    main thread, where deployments run flows). Inside a dbt invocation that exception is caught
    by dbt (``dbtRunner.invoke`` returns any exception as a failed result), and prefect-dbt and
    postload.dbt re-raise it as a plain invocation error: the run would end ``Failed`` with an
    empty dbt error instead of ``TimedOut``. Prefect's engine turns any ``TimeoutError`` raised
    by the flow into ``TimedOut``, so an exception that reaches here after the timeout is one.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        limit = _current_flow_timeout()
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            # The scope starts a moment before this function: allow for that moment.
            if limit and time.monotonic() - started >= limit - 0.5:
                raise TimeoutError(
                    f"Flow run exceeded timeout of {limit:g} second(s) "
                    f"(it then failed with {type(exc).__name__})"
                ) from exc
            raise

    return wrapper


def _current_flow_timeout() -> float | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context.flow.timeout_seconds if context and context.flow else None


def flow_options() -> dict[str, Any]:
    """The ``@flow(...)`` keywords every postload flow shares: timeout and state hooks."""
    return {
        "timeout_seconds": flow_timeout_seconds(),
        "on_failure": [on_failure],
        "on_completion": [on_completion],
    }


# --- failure: the Slack message -----------------------------------------------------------------


def on_failure(flow: Flow[Any, Any], flow_run: FlowRun, state: State[Any]) -> None:
    """Send the failed run's Slack message (Crashed runs are announced by an automation)."""
    from prefect_slack import SlackWebhook  # type: ignore[import-untyped]

    logger = _logger()
    try:
        block = SlackWebhook.load(SLACK_HOOK_BLOCK, _sync=True)
    except ValueError:  # no such block document: Slack is not configured
        logger.info("no %r block: no Slack message for this failure", SLACK_HOOK_BLOCK)
        return
    subject, body = failure_message(flow.name, flow_run, state, _build_result(state))
    for attempt in range(1, SLACK_ATTEMPTS + 1):
        try:
            block.notify(body, subject, _sync=True)
            return
        except Exception as exc:  # a hook must not raise; say why, never the URL
            logger.warning(
                "Slack message for this failure not sent (attempt %d/%d): %s",
                attempt,
                SLACK_ATTEMPTS,
                type(exc).__name__,
            )
            if attempt < SLACK_ATTEMPTS:
                time.sleep(attempt)


def failure_message(
    flow_name: str, flow_run: FlowRun, state: State[Any], build: DbtBuildResult | None
) -> tuple[str, str]:
    """Subject and body of a failed run's Slack message (mrkdwn)."""
    deployment = _deployment_name(flow_run)
    lines = [
        f"Flow run `{flow_run.name}` of `{flow_name}`"
        + (f" (deployment `{deployment}`)" if deployment else "")
        + f" ended {state.name}.",
        state.message or "",
    ]
    if state.name == "TimedOut":
        lines.append(
            "Its build recorded nothing: the next run builds the same sources again. Its writer "
            "slot is free."
        )
    if build is not None and build.failed_nodes:
        failed = build.failed_nodes
        lines.append(f"Failed dbt nodes ({len(failed)}) of `dbt build {build.selection}`:")
        for node in failed[:MAX_NODES_LISTED]:
            message = (node.message or "no message").strip()
            if len(message) > MAX_NODE_MESSAGE_CHARS:
                message = message[:MAX_NODE_MESSAGE_CHARS] + "…"
            lines.append(f"• {node.resource_type} `{node.name}` ({node.status}): {message}")
        if len(failed) > MAX_NODES_LISTED:
            lines.append(f"… and {len(failed) - MAX_NODES_LISTED} more")
    if url := _ui_url(flow_run):
        lines.append(f"Run: {url}")
    subject = f"postload: {flow_name} {(state.name or 'failed').lower()}"
    return subject, "\n".join(line for line in lines if line)


def _build_result(state: State[Any]) -> DbtBuildResult | None:
    from postload.dbt.results import DbtBuildError

    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # a result that cannot be read: the state message still says what failed
        return None
    seen = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        if isinstance(exc, DbtBuildError):
            return exc.result
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _deployment_name(flow_run: FlowRun) -> str | None:
    from prefect.runtime import deployment

    try:
        return deployment.name if flow_run.deployment_id else None
    except Exception:  # the name is a nicety
        return None


def _ui_url(flow_run: FlowRun) -> str | None:
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{base}/runs/flow-run/{flow_run.id}" if base else None


# --- completion: resolve the pages of earlier failures ------------------------------------------

PAGE_STATES = ("FAILED", "CRASHED")  # Failed and TimedOut are both of type FAILED
# A bound on the resolves one success sends: more failed runs than this since the last success
# means a page storm someone is already handling.
MAX_RESOLVES = 50


def on_completion(flow: Flow[Any, Any], flow_run: FlowRun, state: State[Any]) -> None:
    """Resolve the PagerDuty alerts of this deployment's runs that failed since its last success."""
    from postload.alerts import load_pagerduty_target, pagerduty_resolve

    if flow_run.deployment_id is None:
        return  # no deployment: no "next run of the same deployment" to speak for
    logger = _logger()
    target = load_pagerduty_target()
    if target is None:
        return
    try:
        failed = failed_since_last_success(flow_run)
    except Exception as exc:  # a hook must not raise
        logger.warning("could not list earlier failed runs to resolve: %s", type(exc).__name__)
        return
    for run_id in failed:
        pagerduty_resolve(target, run_id, logger)
    if failed:
        logger.info("resolved the PagerDuty alerts of %d earlier failed run(s)", len(failed))


def failed_since_last_success(flow_run: FlowRun) -> list[str]:
    """Ids of the deployment's Failed/TimedOut/Crashed runs that ended after its previous success."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterEndTime,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    assert flow_run.deployment_id is not None
    deployment = DeploymentFilter(id=DeploymentFilterId(any_=[flow_run.deployment_id]))
    with get_client(sync_client=True) as client:
        previous = client.read_flow_runs(
            deployment_filter=deployment,
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(not_any_=[flow_run.id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])),
            ),
            sort=FlowRunSort.END_TIME_DESC,
            limit=1,
        )
        since = previous[0].end_time if previous else None
        failed = client.read_flow_runs(
            deployment_filter=deployment,
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType(s) for s in PAGE_STATES])
                ),
                end_time=FlowRunFilterEndTime(after_=since) if since else None,
            ),
            sort=FlowRunSort.END_TIME_DESC,
            limit=MAX_RESOLVES,
        )
    return [str(run.id) for run in failed]


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
