"""The README's demo: a real load-then-transform pipeline on the embedded stack."""

from __future__ import annotations

from collections.abc import Callable

from postload.config import PipelineConfig, Settings
from postload.demo_data import DEMO_SOURCES, write_demo_batch
from postload.pipeline import render_text_table, status_table
from postload.warehouse import open_warehouse


def _next_batch(settings: Settings, source: str) -> int:
    folder = settings.stage_root_path / source
    return len(list(folder.glob(f"{source}_*.jsonl"))) + 1 if folder.is_dir() else 1


def run_demo(
    settings: Settings,
    pipeline: PipelineConfig,
    *,
    event_batches: int = 1,
    echo: Callable[[str], None] = print,
) -> int:
    """Returns a process exit code: 0 when every flow run completed."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from flows.load_and_transform import load_and_transform

    unknown = [s for s in DEMO_SOURCES if s not in pipeline.source_names]
    if unknown:
        echo(f"the demo needs sources {', '.join(DEMO_SOURCES)} in the pipeline config")
        return 2

    stage = settings.stage_root_path
    echo(f"stage: {stage}")
    echo(f"warehouse: DuckDB file {settings.duckdb_file}")
    if not PREFECT_API_URL.value():
        echo(
            "Prefect: no PREFECT_API_URL set, so flows run against a temporary local API "
            "(start `prefect server start` and export PREFECT_API_URL to watch them in the UI)"
        )

    failures = 0
    for source in DEMO_SOURCES:
        if _next_batch(settings, source) == 1:
            path = write_demo_batch(stage, source, 1)
            echo(f"\n→ landed {path.name} (50 lines, 2 malformed) for {source}")
    for source in DEMO_SOURCES:
        failures += _run(load_and_transform, source, echo)

    for _ in range(event_batches):
        path = write_demo_batch(stage, "events", _next_batch(settings, "events"))
        echo(f"\n→ landed {path.name} for events: only models downstream of events rebuild")
        failures += _run(load_and_transform, "events", echo)

    echo("\n→ orders again with no new files: a quiet no-op")
    failures += _run(load_and_transform, "orders", echo)

    warehouse = open_warehouse(settings, pipeline)
    echo("\npipeline status (ops.pipeline_status):")
    echo(render_text_table(status_table(warehouse.pipeline_status())))
    echo("\nwhere to look next:")
    ui = PREFECT_UI_URL.value()
    if PREFECT_API_URL.value() and ui:
        echo(f"  Prefect UI:  {ui}/runs  (flow runs, per-model tasks, artifacts)")
    echo(f"  DuckDB:      duckdb {settings.duckdb_file}  then  select * from ops.pipeline_status;")
    echo("  plan:        postload plan orders   (what a load of orders would build)")
    return 1 if failures else 0


def _run(flow_fn, source: str, echo: Callable[[str], None]) -> int:
    try:
        result = flow_fn(source)
    except Exception as exc:
        echo(f"  {source}: FAILED: {exc}")
        return 1
    built = [uid.split(".")[-1] for uid in result["dbt_nodes"] if uid.startswith("model.")]
    echo(
        f"  {source}: {result['outcome']} ({result['rows_loaded']} rows, "
        f"{result['rows_rejected']} rejected), dbt {result['dbt_status']}"
        + (f": built {', '.join(built)}" if built else "")
    )
    return 0
