"""`postload serve` waits for the Prefect API it is started next to, and says when it cannot;
it serves load-and-transform hourly for each COPY source of the pipeline config it starts with."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.schedules import Schedule
from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

from postload.config import PipelineConfig
from postload.local.serve import (
    ApiNotReadyError,
    copy_source_schedules,
    deployment_specs,
    describe_schedule,
    schedule_from_entry,
    served_flows,
    wait_for_api,
)
from tests.conftest import REPO, PostloadHome
from tests.fivetran.test_receiver import free_port


@dataclass
class HealthAnswers:
    """What a loopback API answers to GET /api/health, one status per request (the last repeats)."""

    statuses: list[int]
    seen: list[str] = field(default_factory=list)


@pytest.fixture
def api(request: pytest.FixtureRequest) -> Iterator[HealthAnswers]:
    answers = HealthAnswers(list(request.param))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answers.seen.append(self.path)
            status = answers.statuses.pop(0) if len(answers.statuses) > 1 else answers.statuses[0]
            body = b"true" if status == 200 else b'{"detail": "starting"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        with temporary_settings({PREFECT_API_URL: url, PREFECT_API_KEY: None}):
            yield answers
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("api", [[503, 200]], indirect=True)
def test_waits_while_the_server_is_starting(api: HealthAnswers) -> None:
    wait_for_api(timeout_s=60, poll_s=0.05)
    # Prefect's client retries a 503 itself before the health check reports it: at least the
    # two answers were read, the last one healthy.
    assert len(api.seen) >= 2
    assert set(api.seen) == {"/api/health"}
    assert api.statuses == [200]


@pytest.mark.parametrize("api", [[401]], indirect=True)
def test_a_refusal_is_reported_at_once(api: HealthAnswers) -> None:
    with pytest.raises(
        ApiNotReadyError, match=r"HTTP 401: is PREFECT_API_URL \(and PREFECT_API_KEY\)"
    ):
        wait_for_api(timeout_s=600, poll_s=0.05)
    assert len(api.seen) == 1


def test_no_server_at_all_fails_naming_the_url_after_the_timeout() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    with (
        temporary_settings({PREFECT_API_URL: url, PREFECT_API_KEY: None}),
        pytest.raises(ApiNotReadyError) as failure,
    ):
        wait_for_api(timeout_s=0.5, poll_s=0.05)
    assert f"the Prefect API at {url} did not answer its health check within 0 s" in str(
        failure.value
    )
    assert "ConnectError" in str(failure.value)


# --- schedules made from the pipeline config ---------------------------------------------------


def pipeline_of(**loaders: str) -> PipelineConfig:
    """A pipeline config with one source per keyword: ``orders="copy"``, ``crm="fivetran"``."""
    sources = []
    for name, loader in loaders.items():
        source: dict[str, Any] = {"name": name, "raw_table": name, "stage": name}
        if loader == "fivetran":
            source["loader"] = {"type": "fivetran", "connector_id": f"conn_{name}"}
        sources.append(source)
    return PipelineConfig.model_validate({"sources": sources})


def load_schedules(pipeline: PipelineConfig | None = None) -> list[Schedule]:
    [(flow, kwargs)] = served_flows(
        REPO / "prefect.yaml", only=["load-and-transform"], pipeline=pipeline
    )
    assert flow.name == "load-and-transform"
    # No default source: a run without one names the config's sources in its error.
    assert kwargs["parameters"] == {}
    return kwargs["schedules"]


def hourly(schedules: list[Schedule]) -> list[tuple[str | None, bool, dict[str, Any]]]:
    return [(s.cron, s.active, s.parameters) for s in schedules]


def test_a_config_without_an_events_source_gets_no_events_schedule() -> None:
    schedules = load_schedules(pipeline_of(customers="copy", orders="copy"))
    assert hourly(schedules) == [
        ("0 * * * *", True, {"source": "customers"}),
        ("0 * * * *", True, {"source": "orders"}),
    ]
    assert all(s.parameters["source"] != "events" for s in schedules)


def test_one_hourly_load_per_copy_source_and_none_for_fivetran_sources() -> None:
    schedules = load_schedules(pipeline_of(crm="fivetran", clicks="copy", invoices="copy"))
    assert hourly(schedules) == [
        ("0 * * * *", True, {"source": "clicks"}),
        ("0 * * * *", True, {"source": "invoices"}),
    ]


def test_a_fivetran_only_config_gets_no_load_schedule() -> None:
    assert load_schedules(pipeline_of(crm="fivetran", billing="fivetran")) == []


def test_serve_reads_the_pipeline_config_when_it_starts(postload_home: PostloadHome) -> None:
    path = postload_home.root / "postload.yaml"
    config = yaml.safe_load(path.read_text())
    config["sources"] = [s for s in config["sources"] if s["name"] != "events"]
    config["sources"][0]["loader"] = {"type": "fivetran", "connector_id": "conn_customers"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    assert hourly(load_schedules()) == [("0 * * * *", True, {"source": "orders"})]


def test_no_schedules_reads_no_pipeline_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTLOAD_PROJECT_DIR", str(tmp_path))  # no postload.yaml here
    served = served_flows(REPO / "prefect.yaml", with_schedules=False)
    assert [kwargs["schedules"] for _, kwargs in served] == [[], [], []]


def test_the_sweeps_are_served_as_declared() -> None:
    served = dict(
        (kwargs["name"], kwargs["schedules"])
        for _, kwargs in served_flows(
            REPO / "prefect.yaml",
            only=["transform-on-sync", "full-run-when-fresh"],
            pipeline=pipeline_of(crm="fivetran"),
        )
    )
    for name, [sweep] in served.items():
        assert sweep.interval == timedelta(seconds=900), name
        assert (sweep.active, sweep.parameters) == (True, {}), name


def test_templates_keep_their_own_settings_and_parameters() -> None:
    templates = [
        {"cron": "30 6 * * 1-5", "timezone": "Europe/Paris", "parameters": {"x": 1}},
        {"interval": 600, "active": False},
    ]
    made = copy_source_schedules(templates, pipeline_of(a="copy", b="fivetran", c="copy"))
    assert made == [
        {"cron": "30 6 * * 1-5", "timezone": "Europe/Paris", "parameters": {"x": 1, "source": "a"}},
        {"interval": 600, "active": False, "parameters": {"source": "a"}},
        {"cron": "30 6 * * 1-5", "timezone": "Europe/Paris", "parameters": {"x": 1, "source": "c"}},
        {"interval": 600, "active": False, "parameters": {"source": "c"}},
    ]
    cron, interval = (schedule_from_entry(entry) for entry in made[:2])
    assert (cron.cron, cron.timezone, cron.parameters) == (
        "30 6 * * 1-5",
        "Europe/Paris",
        {"x": 1, "source": "a"},
    )
    assert (interval.interval, interval.active) == (timedelta(minutes=10), False)
    assert describe_schedule(cron) == "cron 30 6 * * 1-5 (Europe/Paris) x=1 source=a"
    assert describe_schedule(interval) == "every 600 s source=a inactive"


def test_a_schedule_neither_cron_nor_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="expected a `cron` or an `interval` entry"):
        schedule_from_entry({"rrule": "FREQ=DAILY"})


def test_templates_for_a_deployment_the_file_lacks_are_refused(tmp_path: Path) -> None:
    document = yaml.safe_load((REPO / "prefect.yaml").read_text())
    document["definitions"]["copy_source_schedules"]["load-and-transfrom"] = [{"cron": "0 * * * *"}]
    prefect_yaml = tmp_path / "prefect.yaml"
    prefect_yaml.write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match="names no deployment of the file: load-and-transfrom"):
        deployment_specs(prefect_yaml)
