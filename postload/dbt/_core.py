"""dbt Core through prefect-dbt's ``PrefectDbtRunner``.

Inside a flow run every dbt node becomes a Prefect task with its asset lineage; outside one (the
benchmarks, ``postload plan``) the same runner just runs dbt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from dbt.artifacts.schemas.results import RunStatus, TestStatus
from dbt.contracts.results import RunExecutionResult
from dbt_common.events.base_types import EventLevel
from prefect.context import FlowRunContext, TaskRunContext
from prefect.settings import get_current_settings
from prefect_dbt import PrefectDbtRunner

from postload.config import NodeTaskMode, Selection
from postload.dbt._invocation import dbt_shares_duckdb_instance, running_dbt_command
from postload.dbt._prefect_dbt_public import (
    NODE_TASK_THREAD_PREFIX,
    DbtSettings,
    internals_supported,
    unused_client,
)
from postload.dbt.project import DbtInvocationError, DbtProject
from postload.dbt.results import DbtBuildResult, NodeResult, retryable

__all__ = ["NODE_TASK_THREAD_PREFIX", "CoreDbtRunner", "DbtInvocationError", "node_result"]

# dbt events prefect-dbt forwards to the flow run's logs: warnings and errors. Its default,
# Prefect's own level (INFO), also ships dbt's START/OK line of every node and the run's summary
# lines: on the demo build that cost ~0.25 s of a ~0.9 s bare build (processing each event, the
# log API and the server). Node outcomes stay visible as task states, failures as ERROR events.
# dbt's own log file keeps INFO, as with prefect-dbt's default.
DBT_EVENTS_TO_PREFECT_LOGS = EventLevel.WARN
DBT_LOG_FILE_LEVEL = "info"


class CoreDbtRunner:
    kind = "core"

    def __init__(
        self,
        project_dir: Path,
        duckdb_path: Path,
        *,
        target_path: Path | None = None,
        existing_relations: Callable[[], set[tuple[str, str]]] | None = None,
        node_retries: int = 0,
        node_retry_delay_seconds: float = 0.0,
        node_task_mode: NodeTaskMode | None = None,
        warehouse_is_duckdb: bool | None = None,
        profile_vars: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.project = DbtProject(
            project_dir, duckdb_path, target_path=target_path, profile_vars=profile_vars
        )
        # None: not told (tests, benchmarks): the profile is checked against the DuckDB file only.
        self.warehouse_is_duckdb = warehouse_is_duckdb
        self._profile_checked = False
        self._kept_open: duckdb.DuckDBPyConnection | None = None
        self.existing_relations = existing_relations
        self.node_retries = node_retries
        self.node_retry_delay_seconds = node_retry_delay_seconds
        self.node_task_mode = node_task_mode or NodeTaskMode.default()
        # Another prefect-dbt than the tested one: its own runner, none of postload's changes
        # to it (they rely on its internals). Decided once per runner; warned once per process.
        self.plain_prefect_dbt = not internals_supported()

    def _runner(self) -> PrefectDbtRunner:
        settings = DbtSettings(
            project_dir=self.project.project_dir,
            profiles_dir=self.project.profiles_dir(),
            target_path=self.project.target_path,
            log_level=DBT_EVENTS_TO_PREFECT_LOGS,
        )
        client = unused_client(get_current_settings().api.url)
        if self.plain_prefect_dbt:
            return PrefectDbtRunner(settings=settings, raise_on_failure=False, client=client)
        from postload.dbt._prefect_dbt import NodeTaskDbtRunner

        runner = NodeTaskDbtRunner(settings=settings, raise_on_failure=False, client=client)
        runner.node_task_mode = self.node_task_mode
        runner.on_run_begins = self._let_go_of_duckdb_unless_dbt_shares_it
        return runner

    @contextmanager
    def _one_duckdb_instance(self) -> Iterator[None]:
        """One DuckDB instance for the build's catalog check and dbt's run, when dbt can share it.

        A ``duckdb.connect()`` that finds no open instance of the file in the process starts one
        (~11 ms, whatever the file or config), and the last connection's close checkpoints it:
        the missing-parents check and dbt-duckdb each did, one after the other. Held open here,
        both connect to this one. DuckDB shares an instance only
        between connections of the same configuration, and dbt-duckdb's comes from the profile,
        which dbt has read by ConcurrencyLine: then ``_let_go_of_duckdb_unless_dbt_shares_it``
        closes this one unless dbt's connection will be like it. That check runs from
        prefect-dbt's event callback, which exists inside a flow or task run only: elsewhere
        nothing is held.
        """
        if not (
            self.warehouse_is_duckdb
            and not self.plain_prefect_dbt  # nothing would close it before dbt connects
            and (FlowRunContext.get() or TaskRunContext.get())
        ):
            yield
            return
        try:
            self._kept_open = duckdb.connect(str(self.project.duckdb_path))
        except duckdb.Error:  # another process writes it: the usual paths wait and report
            yield
            return
        try:
            yield
        finally:
            self._let_go_of_duckdb()

    def _let_go_of_duckdb(self) -> None:
        kept, self._kept_open = self._kept_open, None
        if kept is not None:
            kept.close()

    def _let_go_of_duckdb_unless_dbt_shares_it(self) -> None:
        config = running_dbt_command("runtime_config")
        if not dbt_shares_duckdb_instance(
            getattr(config, "credentials", None), self.project.duckdb_path
        ):
            self._let_go_of_duckdb()

    def check_profile(self) -> None:
        """Refuse a profile that would not build in postload's warehouse (once per runner)."""
        if not self._profile_checked:
            self.project.check_profile(self.warehouse_is_duckdb, self.project.duckdb_path)
            self._profile_checked = True

    def invoke(self, args: list[str]) -> Any:
        """Run a dbt command through PrefectDbtRunner (nodes become Prefect tasks in a flow run).

        The project's packages are installed first when they are missing (``dbt deps``, once).
        """
        self.project.ensure_packages()
        try:
            with self.project.profile_env():
                return self._runner().invoke(args, log_level_file=DBT_LOG_FILE_LEVEL)
        except ValueError as exc:  # prefect-dbt wraps dbt's own exception this way
            # dbt's message may quote a rendered profile value: only the redacted text goes on
            raise DbtInvocationError(self.project.redact(str(exc))) from None

    def build(
        self, selection: Selection, *, cause: str, job_id: int | None = None
    ) -> DbtBuildResult:
        # A profile pointing elsewhere would only fail later, on a missing raw schema.
        self.check_profile()
        self.project.ensure_packages()
        with self._one_duckdb_instance():
            return self._build(selection)

    def _build(self, selection: Selection) -> DbtBuildResult:
        nodes: list[NodeResult] = []
        missing = (
            self.project.missing_parents(selection, self.existing_relations)
            if self.existing_relations is not None
            else []
        )
        if missing:
            # A selective build relies on parents outside the selection already existing (the
            # mart joining two sources). On a young warehouse they may not: build just those
            # first instead of failing the models that need them. `run`, not `build`: their tests
            # may need yet other parents, and belong to their own source's selection anyway.
            res = self.invoke(["run", "--select", *missing])
            nodes += [node_result(r) for r in res.result.results]
        res = self.invoke(["build", *selection.cli_args()])
        execution: RunExecutionResult = res.result
        built = [node_result(r) for r in execution.results]
        invocation_id = (execution.args or {}).get("invocation_id") if execution.args else None
        retried: list[list[str]] = []
        for attempt in range(1, self.node_retries + 1):
            if not retryable(built):
                break
            # `dbt retry` re-runs exactly the nodes that errored or were skipped because of them,
            # from this target's run_results.json; a failed *data test* is a finding about the
            # data, so a build whose only failures are tests is never retried.
            if self.node_retry_delay_seconds:
                time.sleep(self.node_retry_delay_seconds * 2 ** (attempt - 1))
            again = [node_result(r) for r in self.invoke(["retry"]).result.results]
            retried.append([n.unique_id for n in again if n.resource_type != "operation"])
            latest = {n.unique_id: n for n in again}
            built = [latest.pop(n.unique_id, n) for n in built] + list(latest.values())
        nodes += built
        notes = []
        if missing:
            notes.append(f"built missing parents first: {', '.join(missing)}")
        if retried:
            notes.append(
                f"dbt retry ran {len(retried)} time(s) for: "
                + ", ".join(dict.fromkeys(uid.rsplit(".", 1)[-1] for a in retried for uid in a))
            )
        if not nodes:
            notes.append("the selection matched no dbt nodes")
        return DbtBuildResult(
            selection=selection.describe(),
            nodes=nodes,
            invocation_id=invocation_id or _invocation_id(),
            message="; ".join(notes) or None,
            retried=retried,
        )


def _invocation_id() -> str | None:
    try:
        from dbt_common.invocation import get_invocation_id

        return get_invocation_id()
    except Exception:  # an id is nice to have, never worth failing a run for
        return None


def node_result(result: Any) -> NodeResult:
    started = completed = None
    for timing in result.timing or []:
        if timing.name == "execute":
            started, completed = timing.started_at, timing.completed_at
    if started is None and result.timing:
        started, completed = result.timing[0].started_at, result.timing[-1].completed_at
    adapter = result.adapter_response or {}
    status = (
        result.status.value
        if isinstance(result.status, RunStatus | TestStatus)
        else str(result.status)
    )
    return NodeResult(
        unique_id=result.node.unique_id,
        name=result.node.name,
        resource_type=str(result.node.resource_type),
        status=status,
        started_at=_naive_utc(started),
        completed_at=_naive_utc(completed),
        execution_time_s=result.execution_time,
        rows_affected=adapter.get("rows_affected"),
        message=result.message,
    )


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)
