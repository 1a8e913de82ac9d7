"""``postload``: the project CLI for what is not a flow (the demo, blocks, plans, status, the
Fivetran webhook receiver)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from postload.config import ConfigError, PipelineConfig, Selection, Settings, SourceConfig

app = typer.Typer(
    help="postload: run dbt the moment data lands, only on what changed. "
    "Runs on the embedded default (DuckDB + dbt-core + a local Prefect API) with no settings.",
    no_args_is_help=True,
    add_completion=False,
)
blocks_app = typer.Typer(help="Prefect blocks for the production parts.", no_args_is_help=True)
app.add_typer(blocks_app, name="blocks")
automations_app = typer.Typer(
    help="Prefect automations that announce failures.", no_args_is_help=True
)
app.add_typer(automations_app, name="automations")
schedules_app = typer.Typer(
    help="Deployment schedules made from the pipeline config.", no_args_is_help=True
)
app.add_typer(schedules_app, name="schedules")

SourceArg = Annotated[str, typer.Argument(help="a source name from the pipeline config")]
SourceOrConnectorArg = Annotated[
    str,
    typer.Argument(
        metavar="SOURCE_OR_CONNECTOR_ID",
        help="a source name, or the connector_id of a Fivetran loader, from the pipeline config",
    ),
]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _settings_and_pipeline():
    settings = Settings()
    try:
        return settings, settings.load_pipeline()
    except ConfigError as exc:
        raise _fail(str(exc)) from None


@app.command()
def init(
    dbt_project: Annotated[
        Path | None,
        typer.Option(
            "--dbt-project",
            help="your dbt project's folder (with dbt_project.yml); default: "
            "POSTLOAD_DBT_PROJECT_DIR, else dbt_project",
        ),
    ] = None,
    fivetran: Annotated[
        list[str] | None,
        typer.Option(
            "--fivetran",
            metavar="CONNECTOR_ID[=DBT_SOURCE]",
            help="the Fivetran connector writing a dbt source (repeatable); without =DBT_SOURCE, "
            "its destination schema is read from Fivetran (FIVETRAN_API_KEY, FIVETRAN_API_SECRET)",
        ),
    ] = None,
) -> None:
    """Write a first postload.yaml (in POSTLOAD_PROJECT_DIR, default the working directory) from
    your dbt project: one source per dbt source, those mapped with --fivetran transformed after
    each sync of their connector. Validated before it is written; never overwrites one."""
    from postload.init import ConfigExistsError, InitError, init_pipeline_config

    settings = Settings()
    try:
        result = init_pipeline_config(
            settings, dbt_project or settings.dbt_project_path, fivetran or []
        )
    except InitError as exc:
        if isinstance(exc, ConfigExistsError):
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {result.path}: {len(result.mapped)} source(s) from the dbt project")
    for name, connector_id in result.mapped.items():
        typer.echo(f"  {name:<20} Fivetran connector {connector_id}")
    if result.unmapped:
        typer.echo(
            f"  left out (commented, no Fivetran connector given): {', '.join(result.unmapped)}"
        )
    if result.dbt_project_env is not None:
        typer.secho(
            f"the dbt project is not ./dbt_project: set "
            f"POSTLOAD_DBT_PROJECT_DIR={result.dbt_project_env} wherever postload runs "
            "(postload.yaml cannot hold it)",
            fg="yellow",
        )
    typer.echo("next: `postload doctor` checks the whole setup")


@app.command()
def doctor() -> None:
    """Check the setup, in order: the pipeline config, the config against the dbt project, the
    dbt profile and connection, the warehouse, the Prefect API, the blocks, the deployments and
    the automations. One line per check (✓ ok, ! warning, ✗ failure, - not checked) with what
    to fix. Exits 1 when a required check fails (warnings are fine). Never prints secrets."""
    from postload.doctor import Status, run_checks

    failed = 0
    for result in run_checks(Settings()):
        color = {Status.FAIL: "red", Status.WARN: "yellow"}.get(result.status)
        for i, line in enumerate(result.lines()):
            typer.secho(line, fg=color if i == 0 else None)
        failed += result.failed
    if failed:
        typer.secho(f"{failed} check(s) failed", fg="red")
        raise typer.Exit(code=1)
    typer.echo("everything required holds")


@app.command()
def sources() -> None:
    """List the configured sources, their loader and the dbt work each one selects."""
    settings, pipeline = _settings_and_pipeline()
    typer.echo(f"pipeline config: {settings.pipeline_config_path}")
    for s in pipeline.sources:
        loader = s.loader.type + (
            f" ({s.loader.connector_id})" if s.loader.type == "fivetran" else ""
        )
        job = f", dbt Cloud job {s.dbt_cloud_job_id}" if s.dbt_cloud_job_id else ""
        typer.echo(
            f"  {s.name:<12} {_where(s, pipeline):<24} loader={loader:<10} "
            f"dbt: {s.effective_selection.describe()}{job}"
        )


def _where(source: SourceConfig, pipeline: PipelineConfig) -> str:
    if source.raw_table is not None:
        return f"{pipeline.raw_schema}.{source.raw_table}"
    return f"dbt source {source.dbt_source_name}"


@app.command()
def plan(target: SourceOrConnectorArg) -> None:
    """Print the dbt selection and the nodes it would build, without building: for a source, or
    for a Fivetran connector id (the union of the work of every source it loads). For a source
    read from the dbt project, which of its tables have rows no build covered yet."""
    from postload.dbt import DbtInvocationError, DbtProject
    from postload.plan import union_selection

    settings, pipeline = _settings_and_pipeline()
    project = DbtProject.from_settings(settings)
    connector_sources = pipeline.sources_for_connector(target)
    try:
        if target in pipeline.source_names:
            sources = [pipeline.source(target)]
        elif connector_sources:
            sources = connector_sources
            typer.echo(f"connector {target}: sources {', '.join(s.name for s in sources)}")
        else:
            raise _fail(_unknown_target(target, settings, pipeline))
        selections = _plan_selections(settings, pipeline, sources)
        if len(sources) == 1:
            typer.echo(f"source {sources[0].name}: dbt build {selections[0].describe()}")
            if connector_sources and target in pipeline.source_names:
                typer.secho(
                    f"  note: {target!r} is also a Fivetran connector id; "
                    "this is the plan for the source of that name",
                    fg="yellow",
                )
            selection = selections[0]
        else:
            for src, sel in zip(sources, selections, strict=True):
                typer.echo(f"  {src.name}: {sel.describe()}")
            # The same union a sync-triggered transform builds in one dbt invocation.
            selection = union_selection(selections, project.model_names)
            typer.echo(f"dbt build {selection.describe()}")
        nodes = project.list_nodes(selection)
    except (DbtInvocationError, ConfigError) as exc:
        raise _fail(str(exc)) from None
    if not nodes:
        typer.secho("  the selection matches no dbt nodes: nothing would be built", fg="yellow")
    for uid in nodes:
        typer.echo(f"  {uid}")


def _plan_selections(
    settings: Settings, pipeline: PipelineConfig, sources: list[SourceConfig]
) -> list[Selection]:
    """Each source's selection; for a source read from the dbt project, its tables' state (one
    warehouse query) and the selection of the pending ones (all of them when none is pending)."""
    from postload.plan import pending_tables, source_selection
    from postload.sources import tables_for
    from postload.warehouse import WarehouseUnavailableError, open_warehouse

    if not any(s.tables_from_dbt for s in sources):
        return [s.effective_selection for s in sources]
    tables = tables_for(settings, pipeline)
    mine = {s.name: tables[s.name] for s in sources if s.tables_from_dbt}
    try:
        warehouse = open_warehouse(settings, pipeline)
        warehouse.ensure_schema()
        marks = warehouse.watermarks([t for ts in mine.values() for t in ts])
    except WarehouseUnavailableError as exc:
        typer.secho(f"  which tables are pending is unknown: {exc}", fg="yellow")
        marks = {}
    pending = pending_tables(mine, marks)
    selections = []
    for src in sources:
        if not src.tables_from_dbt:
            selections.append(src.effective_selection)
            continue
        for t in mine[src.name]:
            mark = marks.get(t.key)
            state = (
                "pending"
                if mark is not None and mark.pending
                else "no rows yet"
                if mark is None or mark.latest_loaded_at is None
                else "built"
            )
            typer.echo(f"  {src.name}.{t.table} ({t.relation}): {state}")
        if src.name in pending:
            selections.append(source_selection(src, pending[src.name]))
        else:
            typer.echo(f"  {src.name}: nothing pending; a change to every table would build:")
            selections.append(source_selection(src, mine[src.name]))
    return selections


def _unknown_target(target: str, settings: Settings, pipeline: PipelineConfig) -> str:
    connector_ids = ", ".join(pipeline.connector_ids) or "none: no source has loader type fivetran"
    return (
        f"unknown source or connector id {target!r}: expected one of the sources "
        f"({', '.join(pipeline.source_names)}) or Fivetran connector ids ({connector_ids}) "
        f"in {settings.pipeline_config_path}"
    )


@app.command()
def run(source: SourceArg) -> None:
    """Run the load-and-transform flow for SOURCE once, in this process."""
    from postload.local.serve import deployment_specs, load_deployment_flow

    settings, _ = _settings_and_pipeline()
    # The flow from its entrypoint in the checkout, as a deployment runs it: the library never
    # imports the flows/ package.
    prefect_yaml = settings.project_dir / "prefect.yaml"
    specs = [
        s
        for s in (deployment_specs(prefect_yaml) if prefect_yaml.is_file() else [])
        if s.name == "load-and-transform"
    ]
    if not specs:
        raise _fail(
            f"{prefect_yaml}: no load-and-transform deployment (run from the postload checkout, "
            "or set POSTLOAD_PROJECT_DIR to it)"
        )
    load_and_transform = load_deployment_flow(settings.project_dir, specs[0])
    result = load_and_transform(source)
    typer.echo(f"{result['source']}: {result['outcome']}, dbt {result['dbt_status']}")


@app.command()
def transform(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[SOURCE]...",
            help="only these sources from the pipeline config (default: every pending source)",
        ),
    ] = None,
) -> None:
    """Build now what is pending: the dbt work of every source (or of each SOURCE) with rows no
    successful build covers, as transform-on-sync does, in this process. Re-runs a transform
    that failed (a failed build covers nothing, so its sources stay pending) without waiting for
    new data or the sweep. Exits 1 when a build fails."""
    from postload.dbt import DbtBuildError

    settings, pipeline = _settings_and_pipeline()
    wanted = list(dict.fromkeys(sources or []))
    unknown = [name for name in wanted if name not in pipeline.source_names]
    if unknown:
        raise _fail(
            f"unknown source(s) {', '.join(map(repr, unknown))}: expected sources from "
            f"{settings.pipeline_config_path} ({', '.join(pipeline.source_names)})"
        )
    transform_on_sync = _deployment_flow(settings, "transform-on-sync")
    kwargs: dict[str, object] = {"reason": "manual"}
    if wanted:
        if "sources" not in transform_on_sync.parameters.properties:
            raise _fail(
                "this checkout's transform-on-sync flow takes no `sources` parameter: run "
                "`postload transform` without sources to build every pending source"
            )
        kwargs["sources"] = wanted
    try:
        result = transform_on_sync(**kwargs)
    except DbtBuildError as exc:
        typer.secho(f"failed: {exc}", fg=typer.colors.RED, err=True)
        typer.echo("its sources stay pending: fix the cause, then run `postload transform` again")
        raise typer.Exit(code=1) from None
    builds = result.get("builds") or []
    if not builds:
        scope = f" for {', '.join(wanted)}" if wanted else ""
        typer.echo(f"nothing pending{scope}: every source's rows are covered by a successful build")
    for build in builds:
        typer.echo(
            f"{', '.join(build['sources'])}: dbt build {build['selection']} → {build['status']}"
        )


def _deployment_flow(settings: Settings, name: str) -> Any:
    """The flow of prefect.yaml's deployment ``name``, from its entrypoint in the checkout, as a
    deployment runs it: the library never imports the flows/ package."""
    from postload.local.serve import deployment_specs, load_deployment_flow

    prefect_yaml = settings.project_dir / "prefect.yaml"
    specs = [
        s
        for s in (deployment_specs(prefect_yaml) if prefect_yaml.is_file() else [])
        if s.name == name
    ]
    if not specs:
        raise _fail(
            f"{prefect_yaml}: no {name} deployment (run from the postload checkout, or set "
            "POSTLOAD_PROJECT_DIR to it)"
        )
    return load_deployment_flow(settings.project_dir, specs[0])


@app.command()
def status() -> None:
    """Print the pipeline_status view (per source: last load, last transform, latency)."""
    from postload.report import pipeline_status, render_text_table, status_table
    from postload.sources import tables_for
    from postload.warehouse import open_warehouse

    settings, pipeline = _settings_and_pipeline()
    try:
        tables = tables_for(settings, pipeline)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    warehouse = open_warehouse(settings, pipeline)
    warehouse.ensure_schema()
    typer.echo(render_text_table(status_table(pipeline_status(warehouse, tables))))


@app.command()
def demo(
    port: Annotated[
        int, typer.Option(help="the Prefect server's port (a free one if it is taken)")
    ] = 4200,
    keep_running: Annotated[
        bool, typer.Option(help="leave the stack running after the story (Ctrl-C stops it)")
    ] = False,
) -> None:
    """The whole story on the local stack (Prefect server + UI, runner, webhook receiver):
    two simulated Fivetran syncs → one coalesced transform, a COPY load of events → only its
    models, then one full build once every source is fresh, and the pipeline status."""
    from postload.local.demo import run_demo

    _stop_on_ctrl_c_and_sigterm()
    sys.exit(run_demo(Settings(), api_port=port, keep_running=keep_running, echo=typer.echo))


def _restore_ctrl_c() -> None:
    """Let Ctrl-C (SIGINT) stop this command even when it was started with SIGINT ignored.

    A shell starts a background job (`postload stack &`, a CI step) with SIGINT ignored; Python
    then installs no KeyboardInterrupt handler, and child processes inherit the ignored
    disposition. The stack stops its runner and server with SIGINT, and both commands say Ctrl-C
    stops them. A handler, unlike an ignored signal, is reset to the default in a new program, so
    the stack's children get SIGINT back too.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop_on_ctrl_c_and_sigterm() -> None:
    """For the commands that start processes (stack, demo): Ctrl-C, and SIGTERM (a service
    manager, `kill`, CI ending a job), both raise KeyboardInterrupt, so the command stops
    everything it started on the way out; background jobs included (``_restore_ctrl_c``)."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    _restore_ctrl_c()
    signal.signal(signal.SIGTERM, interrupt)


@app.command()
def stack(
    port: Annotated[int, typer.Option(help="the Prefect server's port (API and UI)")] = 4200,
    receiver_port: Annotated[
        int | None,
        typer.Option(help="the webhook receiver's port (default: POSTLOAD_RECEIVER_PORT, 8787)"),
    ] = None,
    schedules: Annotated[
        bool, typer.Option(help="keep prefect.yaml's schedules (the hourly load, the sweeps)")
    ] = True,
) -> None:
    """Start the whole embedded system: a local Prefect server with its UI, a runner serving
    prefect.yaml's deployments, the webhook receiver and the automations; print the URLs and
    how to send a test event. Ctrl-C stops everything it started."""
    from postload.local.stack import LocalStack, StackError

    _stop_on_ctrl_c_and_sigterm()
    local = LocalStack(
        Settings(),
        api_port=port,
        receiver_port=receiver_port,
        schedules=schedules,
        echo=typer.echo,
    )
    try:
        local.start()
        typer.echo(local.banner(), nl=True)
        for _ in local.wait_forever():
            pass
    except KeyboardInterrupt:
        typer.echo("stopping the stack")
    except StackError as exc:
        raise _fail(str(exc)) from None
    finally:
        local.stop()
    typer.echo("stopped")


@app.command("send-sync")
def send_sync(
    connector_id: Annotated[str, typer.Argument(help="the Fivetran connector id")],
    status: Annotated[
        str, typer.Option(help="data.status: SUCCESSFUL, or e.g. FAILURE_WITH_TASK")
    ] = "SUCCESSFUL",
    url: Annotated[
        str | None,
        typer.Option(help="the receiver's webhook URL (default: this machine's receiver)"),
    ] = None,
) -> None:
    """Send a Fivetran sync_end webhook for a connector, signed with the webhook secret
    (POSTLOAD_FIVETRAN_WEBHOOK_SECRET or the Secret block on PREFECT_API_URL), as Fivetran
    does after a sync."""
    from postload.local.stack import send_sync_end

    settings = Settings()
    try:
        secret, _ = settings.resolve_fivetran_webhook_secret()
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    target = url or f"http://{settings.receiver_host}:{settings.receiver_port}/webhooks/fivetran"
    try:
        response = send_sync_end(target, secret, connector_id, status=status)
    except Exception as exc:  # httpx transport errors: say where, not a traceback
        raise _fail(f"could not POST to {target}: {exc}") from None
    typer.echo(f"{target} → {response.status_code} {response.text.strip()}")
    if response.status_code >= 300:
        raise typer.Exit(code=1)


@app.command()
def receiver(
    host: Annotated[
        str | None,
        typer.Option(help="bind address (default: POSTLOAD_RECEIVER_HOST, else 127.0.0.1)"),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="port (default: POSTLOAD_RECEIVER_PORT, else 8787)"),
    ] = None,
) -> None:
    """Run the Fivetran webhook receiver (POST /webhooks/fivetran, GET /healthz): it checks each
    webhook's signature, stores it in the outbox, answers 202 and forwards it as a Prefect event
    to PREFECT_API_URL. The secret comes from POSTLOAD_FIVETRAN_WEBHOOK_SECRET, else from the
    Prefect Secret block POSTLOAD_FIVETRAN_WEBHOOK_SECRET_BLOCK (default
    postload-fivetran-webhook-secret). Stops gracefully on SIGTERM or Ctrl-C."""
    from prefect.settings import get_current_settings

    from postload.fivetran.receiver import serve

    settings = Settings()
    api = get_current_settings().api
    if not api.url:
        # Prefect's temporary local server would start, receive the events and vanish with them.
        raise _fail(
            "PREFECT_API_URL is not set: the receiver forwards events to {PREFECT_API_URL}/events "
            "of a running Prefect server (e.g. http://127.0.0.1:4200/api) or Cloud workspace"
        )
    try:
        secret, secret_source = settings.resolve_fivetran_webhook_secret()
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    serve(
        settings.receiver_host if host is None else host,
        settings.receiver_port if port is None else port,
        secret_source=secret_source,
        secret=secret,
        outbox_path=settings.receiver_outbox_path,
        prefect_api_url=api.url,
        prefect_api_key=api.key.get_secret_value() if api.key else None,
        prefect_auth_string=api.auth_string.get_secret_value() if api.auth_string else None,
        max_body_bytes=settings.receiver_max_body_bytes,
    )


@app.command("cloud-webhook-template")
def cloud_webhook_template() -> None:
    """Print the Prefect Cloud webhook template (Jinja) that turns Fivetran webhooks into the
    events the receiver emits: prefect cloud webhook create fivetran --template
    "$(postload cloud-webhook-template)". Cloud checks no signature and picks its own event ids."""
    from postload.fivetran.webhook import cloud_webhook_template as template

    typer.echo(template(), nl=False)


@app.command()
def serve(
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="serve only this deployment (repeatable)"),
    ] = None,
    schedules: Annotated[
        bool, typer.Option(help="keep the schedules from prefect.yaml (the hourly load, sweeps)")
    ] = True,
    prefect_yaml: Annotated[
        Path, typer.Option(help="the deployments file; entrypoints are relative to its folder")
    ] = Path("prefect.yaml"),
    warm: Annotated[
        bool,
        typer.Option(
            help="fork each flow run from a process with Prefect and dbt already imported "
            "(seconds faster per run); --no-warm spawns a fresh interpreter per run"
        ),
    ] = True,
) -> None:
    """Run the deployments of prefect.yaml from this checkout (a Prefect runner; needs
    PREFECT_API_URL): their triggers, schedules and concurrency limits, as `prefect deploy`
    would create them for a work pool."""
    from prefect.settings import PREFECT_API_URL

    from postload.local.serve import ApiNotReadyError, serve_deployments

    _stop_on_ctrl_c_and_sigterm()
    if not PREFECT_API_URL.value():
        raise _fail(
            "PREFECT_API_URL is not set: `postload serve` needs a running Prefect server "
            "(e.g. `prefect server start`, then export PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    if not prefect_yaml.is_file():
        raise _fail(
            f"{prefect_yaml}: not found (run from the postload checkout or pass --prefect-yaml)"
        )
    try:
        serve_deployments(
            prefect_yaml,
            only=only,
            with_schedules=schedules,
            warm=warm,
            heartbeat_seconds=Settings().run_heartbeat_seconds,
        )
    except KeyboardInterrupt:  # stopped before the runner started (it reports its own stop)
        typer.echo("stopped")
    except (ValueError, ApiNotReadyError) as exc:
        raise _fail(str(exc)) from None


@automations_app.command("apply")
def automations_apply() -> None:
    """Create or update the failure-notification automations (idempotent; needs the
    postload-slack block from `postload blocks register`)."""
    from postload.alerts import apply_automations, notification_block_ids
    from postload.blocks import SLACK_BLOCK

    slack, pagerduty = notification_block_ids()
    if slack is None:
        raise _fail(
            f"no notification block {SLACK_BLOCK!r}: set SLACK_WEBHOOK_URL and run "
            "`postload blocks register` first"
        )
    applied_automations = apply_automations(
        slack, pagerduty, heartbeat_seconds=Settings().run_heartbeat_seconds
    )
    for applied in applied_automations:
        typer.echo(f"  {applied.name:<28} {applied.action} ({applied.id})")


@schedules_app.command("apply")
def schedules_apply(
    prefect_yaml: Annotated[
        Path, typer.Option(help="the deployments file the deployments were deployed from")
    ] = Path("prefect.yaml"),
) -> None:
    """Set the schedules made from the pipeline config on the deployed deployments (idempotent):
    load-and-transform hourly for each COPY source, with that source as the schedule's parameter,
    none without one. Run it after `prefect deploy` and after changing the sources: prefect.yaml
    cannot read postload.yaml, and `prefect deploy` keeps the schedules this sets."""
    from prefect.settings import PREFECT_API_URL

    from postload.local.serve import apply_copy_source_schedules, describe_schedule

    if not PREFECT_API_URL.value():
        raise _fail(
            "PREFECT_API_URL is not set: the schedules are set on the Prefect server or Cloud "
            "workspace the deployments are on"
        )
    if not prefect_yaml.is_file():
        raise _fail(
            f"{prefect_yaml}: not found (run from the postload checkout or pass --prefect-yaml)"
        )
    _, pipeline = _settings_and_pipeline()
    try:
        applied = apply_copy_source_schedules(prefect_yaml, pipeline)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if not applied:
        typer.echo(f"{prefect_yaml}: no deployment has schedules made from the pipeline config")
    for one in applied:
        what = "replaced" if one.changed else "unchanged"
        typer.echo(f"  {one.deployment:<28} {what}: {len(one.schedules)} schedule(s)")
        for schedule in one.schedules:
            typer.echo(f"    {describe_schedule(schedule)}")


@blocks_app.command("register")
def blocks_register() -> None:
    """Create or update the production blocks from environment variables (idempotent)."""
    from postload.blocks import format_report, register_blocks

    report = register_blocks(Settings())
    typer.echo(format_report(report))
    if not report.ok:  # incomplete, invalid or not saved; a group not configured at all is fine
        raise typer.Exit(code=1)


def main() -> None:
    # A temporary local API (no PREFECT_API_URL) runs as the local stack's server does: analytics
    # off (the embedded default must work offline), task runs recorded in batches.
    from postload.local.stack import use_local_server_settings

    use_local_server_settings()
    # The temporary local API (no PREFECT_API_URL) takes ~25 s to start on 2 cores; Prefect's
    # default budget is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    app()
