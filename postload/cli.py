"""``postload``: the project CLI for what is not a flow (the demo, blocks, plans, status)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from postload.config import ConfigError, Settings, UnknownSourceError

app = typer.Typer(
    help="postload: run dbt the moment data lands, only on what changed. "
    "Runs on the embedded default (DuckDB + dbt-core + a local Prefect API) with no settings.",
    no_args_is_help=True,
    add_completion=False,
)
blocks_app = typer.Typer(help="Prefect blocks for the production parts.", no_args_is_help=True)
app.add_typer(blocks_app, name="blocks")

SourceArg = Annotated[str, typer.Argument(help="a source name from the pipeline config")]


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
            f"  {s.name:<12} {pipeline.raw_schema}.{s.raw_table:<14} loader={loader:<10} "
            f"dbt: {s.effective_selection.describe()}{job}"
        )


@app.command()
def plan(source: SourceArg) -> None:
    """Print the dbt selection for SOURCE and the nodes it would build, without building."""
    from postload.dbt._core import CoreDbtRunner, DbtInvocationError

    settings, pipeline = _settings_and_pipeline()
    try:
        src = pipeline.source(source)
    except UnknownSourceError as exc:
        raise _fail(str(exc)) from None
    selection = src.effective_selection
    typer.echo(f"source {src.name}: dbt build {selection.describe()}")
    runner = CoreDbtRunner(settings.dbt_project_path, settings.duckdb_file)
    try:
        nodes = runner.list_nodes(selection)
    except DbtInvocationError as exc:
        raise _fail(str(exc)) from None
    if not nodes:
        typer.secho("  the selection matches no dbt nodes: nothing would be built", fg="yellow")
    for uid in nodes:
        typer.echo(f"  {uid}")


@app.command()
def run(source: SourceArg) -> None:
    """Run the load-and-transform flow for SOURCE once, in this process."""
    from flows.load_and_transform import load_and_transform

    _settings_and_pipeline()
    result = load_and_transform(source)
    typer.echo(f"{result['source']}: {result['outcome']}, dbt {result['dbt_status']}")


@app.command()
def status() -> None:
    """Print the pipeline_status view (per source: last load, last transform, latency)."""
    from postload.pipeline import render_text_table, status_table
    from postload.warehouse import open_warehouse

    settings, pipeline = _settings_and_pipeline()
    warehouse = open_warehouse(settings, pipeline)
    warehouse.ensure_schema()
    typer.echo(render_text_table(status_table(warehouse.pipeline_status())))


@app.command()
def demo(
    batches: Annotated[
        int, typer.Option(min=1, help="new event batches to land after the first load")
    ] = 1,
) -> None:
    """Land sample files for every source, run load-and-transform for each, then land more
    events and run again: only the models downstream of events are rebuilt."""
    from postload.demo import run_demo

    settings, pipeline = _settings_and_pipeline()
    sys.exit(run_demo(settings, pipeline, event_batches=batches, echo=typer.echo))


@blocks_app.command("register")
def blocks_register() -> None:
    """Create or update the production blocks from environment variables (idempotent)."""
    from postload.blocks import format_report, register_blocks

    report = register_blocks(Settings())
    typer.echo(format_report(report))
    if report.incomplete:
        raise typer.Exit(code=1)


def main() -> None:
    # Prefect's server-side analytics phone home; the embedded default must work offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary local API (no PREFECT_API_URL) takes ~25 s to start on 2 cores; Prefect's
    # default budget is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    app()
