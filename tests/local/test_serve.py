"""`postload serve` waits for the Prefect API it is started next to, and says when it cannot."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

from postload.local.serve import ApiNotReadyError, wait_for_api
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
