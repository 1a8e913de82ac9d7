"""Hostile input to the webhook receiver, generated with hypothesis, against its real ASGI app.

The receiver runs in this process: its Starlette app behind ``httpx.ASGITransport`` on one private
event loop, with a real SQLite outbox in a temporary folder. Assertions read that outbox file: the
forwarder sends nothing but its rows (one test below forwards them to a fake ``/events`` to show
it), so "nothing recorded" is "nothing can reach Prefect". The lifespan (the background
forwarder) is not started, so rows stay where the request put them.

Every request is answered with the documented status (docs/fivetran-webhooks.md): 202 accepted,
200 ``test_event``, 400 bad body, 401 bad or missing signature, 413 too large; never a 500. Each
property says which status it expects from how its input was built, not from the code under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from hypothesis import assume, given
from hypothesis import strategies as st

from postload.fivetran.receiver import MAX_BODY_BYTES, MAX_JSON_DEPTH, Receiver
from postload.fivetran.webhook import SIGNATURE_HEADER, verify_signature
from tests.conftest import hostile, suite_secret

SECRET = suite_secret("hostile receiver: webhook secret", "whsec-hostile-41c7e9d0b2")
# Nothing listens here; no test starts the forwarder except the one that fakes the API.
API = "http://127.0.0.1:9/api"
FIELDS = (
    "event",
    "created",
    "connector_id",
    "connector_name",
    "connector_type",
    "sync_id",
    "destination_group_id",
    "group_id",
    "data",
)


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def strict_json(text: str | bytes) -> Any:
    """Parse as the Prefect API must be able to: RFC 8259 JSON, no NaN or Infinity."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


class InProcessReceiver:
    """The real ``Receiver`` app and outbox, driven on a private event loop."""

    def __init__(
        self,
        outbox: Path,
        max_body_bytes: int = MAX_BODY_BYTES,
        *,
        secret: str = SECRET,
        api: str = API,
        api_key: str | None = None,
    ) -> None:
        self.outbox_path = outbox
        self.secret = secret
        self.loop = asyncio.new_event_loop()
        self.receiver = Receiver(
            secret=secret,
            outbox_path=outbox,
            prefect_api_url=api,
            prefect_api_key=api_key,
            max_body_bytes=max_body_bytes,
        )
        # raise_app_exceptions=False: an unhandled error must show up as the 500 the client
        # would see, which the properties then refuse.
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.receiver.app, raise_app_exceptions=False),
            base_url="http://receiver.test",
        )

    def post(
        self,
        content: bytes | Callable[[], AsyncIterator[bytes]],
        headers: list[tuple[str | bytes, str | bytes]],
    ) -> httpx.Response:
        body = content() if callable(content) else content
        # Values as bytes: httpx encodes str values as ASCII, while HTTP carries any octet.
        raw_headers = [
            (name, value.encode("latin-1") if isinstance(value, str) else value)
            for name, value in headers
        ]
        return self.loop.run_until_complete(
            self.client.post("/webhooks/fivetran", content=body, headers=raw_headers)
        )

    def post_signed(self, body: bytes) -> httpx.Response:
        return self.post(body, [(SIGNATURE_HEADER, sign(body, self.secret))])

    def forward(self) -> int:
        return self.loop.run_until_complete(self.receiver.forward_pending_once())

    def get(self, path: str) -> httpx.Response:
        return self.loop.run_until_complete(self.client.get(path))

    def rows(self) -> dict[str, dict[str, Any]]:
        """The outbox as the forwarder will read it: event id -> the stored Prefect event."""
        db = sqlite3.connect(f"file:{self.outbox_path}?mode=ro", uri=True)
        try:
            stored = db.execute("select id, event from outbox").fetchall()
        finally:
            db.close()
        # Every stored event must be strict JSON, or the Prefect API refuses (or mangles) it.
        return {event_id: strict_json(event) for event_id, event in stored}

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(self.receiver.aclose())
        self.loop.close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[InProcessReceiver]:
    under_test = InProcessReceiver(tmp_path / "outbox.sqlite3")
    yield under_test
    under_test.close()


# --- strategies ------------------------------------------------------------------------------

fivetran_ids = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,40}", fullmatch=True)
event_types = st.from_regex(r"[a-z_]{1,64}", fullmatch=True).filter(lambda e: e != "test_event")
# Unicode everywhere: every category hypothesis draws from, NUL and emoji included (lone
# surrogates cannot be drawn as text; they are sent as JSON escapes further down).
any_text = st.text(max_size=40)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
created_values = (
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets
    ).map(datetime.isoformat)
    | st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
        lambda d: d.isoformat() + "Z"
    )
    # Unix seconds, as pydantic also reads them.
    | st.integers(0, 4_000_000_000)
)
statuses = st.sampled_from(["SUCCESSFUL", "FAILURE", "FAILURE_WITH_TASK", "RESCHEDULED"])


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A body of the documented shape: required fields valid, optional ones present or not,
    descriptive fields in any script, unknown keys (Fivetran adds fields over time)."""
    body: dict[str, Any] = {
        "event": draw(st.just("sync_end") | event_types),
        "connector_id": draw(fivetran_ids),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "created": st.none() | created_values,
        "connector_name": st.none() | st.text(max_size=500),
        "connector_type": st.none() | st.text(max_size=500),
        "sync_id": st.none() | fivetran_ids,
        "destination_group_id": st.none() | fivetran_ids,
        "group_id": st.none() | fivetran_ids,
        "data": st.none()
        | st.fixed_dictionaries({}, optional={"status": st.none() | statuses | any_text})
        | st.dictionaries(any_text, json_values, max_size=4),
    }
    for key, values in optional.items():
        if draw(st.booleans()):
            body[key] = draw(values)
    extra = draw(st.dictionaries(any_text.filter(lambda k: k not in FIELDS), json_values))
    return {**extra, **body}


def encodings(body: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """The same JSON document as bytes in the ways a sender may write it."""
    return st.sampled_from(
        [
            json.dumps(body).encode(),
            json.dumps(body, ensure_ascii=False).encode("utf-8"),
            json.dumps(body, indent=2, ensure_ascii=False).encode("utf-8"),
            json.dumps(body, separators=(",", ":")).encode(),
        ]
    )


def expected_event_name(body: dict[str, Any]) -> str:
    """docs/fivetran-webhooks.md's mapping table, restated: the oracle for what a valid body becomes."""
    if body["event"] == "sync_end":
        status = (body.get("data") or {}).get("status")
        return "fivetran.sync.succeeded" if status == "SUCCESSFUL" else "fivetran.sync.failed"
    return f"fivetran.{body['event']}"


# Values of a type the field does not take (None is absent for the optional fields, so valid).
wrong_for_str = (
    (st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.booleans())
    | st.lists(json_scalars, max_size=3)
    | st.dictionaries(any_text, json_scalars, max_size=3)
)
wrong_types: dict[str, st.SearchStrategy[Any]] = {
    "event": wrong_for_str | st.none(),
    "connector_id": wrong_for_str | st.none(),
    "connector_name": wrong_for_str,
    "connector_type": wrong_for_str,
    "sync_id": wrong_for_str,
    "destination_group_id": wrong_for_str,
    "group_id": wrong_for_str,
    "created": st.booleans()
    | st.lists(json_scalars, max_size=3)
    | st.dictionaries(any_text, json_scalars, max_size=3)
    | any_text.map(lambda t: f"not a date {t}")
    # Valid ISO timestamps that fall outside years 1-9999 once converted to UTC.
    | st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-00:01"]),
    "data": st.integers() | st.booleans() | any_text | st.lists(json_scalars, max_size=3),
}


def _fullmatch(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None


id_pattern = r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,199}"
bad_ids = st.text(max_size=60).filter(lambda t: not _fullmatch(id_pattern, t)) | st.sampled_from(
    ["x; drop table raw.events; --", "-rf", "../etc", "a" * 201, "a\nb", "é"]
)
bad_strings: dict[str, st.SearchStrategy[Any]] = {
    "event": st.text(max_size=70).filter(
        lambda t: not _fullmatch(r"[a-z_]{1,64}", t) and t != "test_event"
    ),
    "connector_id": bad_ids,
    "sync_id": bad_ids,
    "destination_group_id": bad_ids,
    "group_id": bad_ids,
    "connector_name": st.text(min_size=501, max_size=520),
    "connector_type": st.text(min_size=501, max_size=520),
}


@st.composite
def invalid_bodies(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    """A valid body with one or more fields broken (a wrong type, a value outside its pattern,
    or a required one missing); returns the body and the names of the broken fields."""
    body = draw(valid_bodies())
    if body["event"] == "test_event":  # pragma: no cover - excluded by event_types
        body["event"] = "sync_end"
    broken = draw(st.sets(st.sampled_from(FIELDS), min_size=1, max_size=3))
    for field in broken:
        how = draw(st.sampled_from(["type", "string", "missing"]))
        if how == "missing" and field in ("event", "connector_id"):
            body.pop(field, None)
        elif how == "string" and field in bad_strings:
            body[field] = draw(bad_strings[field])
        else:
            body[field] = draw(wrong_types[field])
    # A broken "event" that happens to read test_event would be the connectivity check (200).
    assume(body.get("event") != "test_event")
    return body, broken


def nest(depth: int, leaf: str, kind: str) -> str:
    """JSON text: the JSON ``leaf`` inside ``depth`` lists or single-key objects (as text,
    because json.dumps itself cannot write what is nested near the recursion limit)."""
    opening, closing = ("[", "]") if kind == "list" else ('{"k":', "}")
    return opening * depth + leaf + closing * depth


# --- the properties --------------------------------------------------------------------------


def test_valid_signed_bodies_are_accepted_once_with_the_documented_event(
    app: InProcessReceiver,
) -> None:
    @hostile(250)
    @given(body=valid_bodies(), data=st.data())
    def accepted(body: dict[str, Any], data: st.DataObject) -> None:
        raw = data.draw(encodings(body))
        before = app.rows()
        response = app.post_signed(raw)
        assert response.status_code == 202, response.text
        reply = response.json()
        rows = app.rows()
        event_id = reply["event_id"]
        # A redelivery (the same key drawn twice) is acknowledged and adds nothing.
        assert reply["duplicate"] is (event_id in before)
        assert set(rows) == set(before) | {event_id}
        if reply["duplicate"]:
            return
        event = rows[event_id]
        assert event["event"] == expected_event_name(body)
        assert event["payload"] == json.loads(raw)
        resource = event["resource"]
        assert resource["prefect.resource.id"] == f"fivetran.connector.{body['connector_id']}"
        assert resource["fivetran.connector_id"] == body["connector_id"]
        assert resource.get("fivetran.sync_id") == body.get("sync_id")

    accepted()


def test_bodies_of_the_wrong_shape_are_400_naming_the_field_and_record_nothing(
    app: InProcessReceiver,
) -> None:
    @hostile(250)
    @given(case=invalid_bodies())
    def refused(case: tuple[dict[str, Any], set[str]]) -> None:
        body, broken = case
        response = app.post_signed(json.dumps(body).encode())
        assert response.status_code == 400, response.text
        reply = response.json()
        # Only fields that were broken are named (a broken one may hide behind another: the
        # model reports every invalid field, but never one that was left valid).
        named = {item["field"].split(".")[0] for item in reply["invalid"]}
        assert named, reply
        assert named <= broken, (named, broken)
        assert app.rows() == {}

    refused()


def test_bodies_the_prefect_api_cannot_store_are_400_and_record_nothing(
    app: InProcessReceiver,
) -> None:
    """Deep nesting, lone surrogates and numbers beyond a double: json.loads takes them, the
    Prefect API does not (it answers 500 for the first two, which would block the outbox)."""
    marker = "@@POISON@@"

    @hostile(150)
    @given(
        body=valid_bodies(),
        where=st.sampled_from(["data", "extra", "connector_name"]),
        poison=st.one_of(
            st.tuples(st.just("nest"), st.integers(0, 3000), st.sampled_from(["list", "dict"])),
            st.tuples(st.just("surrogate"), st.sampled_from(["\\ud800", "\\udfff", "x\\udc00"])),
            st.tuples(st.just("huge number"), st.sampled_from(["1e400", "-1e999", "1E+309"])),
        ),
    )
    def refused(body: dict[str, Any], where: str, poison: tuple[Any, ...]) -> None:
        kind = poison[0]
        depth = poison[1] if kind == "nest" else 0
        # The body is level 1. The innermost container of the poison then sits at this level:
        if where == "data":
            body["data"] = {"status": "SUCCESSFUL", "x": marker}
            innermost = depth + 2
        elif where == "extra":
            body["poisoned"] = marker
            innermost = depth + 1
        else:
            body["connector_name"] = marker  # a container here is also a wrong type
            innermost = 1 if depth == 0 else MAX_JSON_DEPTH + 1
        poisoned = {
            "nest": lambda: nest(depth, '"deep"', poison[-1]),
            "surrogate": lambda: f'"{poison[1]}"',
            "huge number": lambda: poison[1],
        }[kind]()
        raw = json.dumps(body).replace(json.dumps(marker), poisoned)
        before = app.rows()
        response = app.post_signed(raw.encode())
        if kind == "nest" and innermost <= MAX_JSON_DEPTH:
            assert response.status_code == 202, response.text
        else:
            assert response.status_code == 400, response.text
            assert app.rows() == before

    refused()


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_nesting_limit_boundary(app: InProcessReceiver, kind: str) -> None:
    """Up to MAX_JSON_DEPTH levels a body is taken; one more and it is refused (400), far below
    the ~960 levels where the interpreter's recursion limit turned it into a 500."""
    # data (level 2) holds "x", whose innermost container is at level depth + 2.
    for depth, status in ((MAX_JSON_DEPTH - 2, 202), (MAX_JSON_DEPTH - 1, 400), (963, 400)):
        raw = f'{{"event": "x", "connector_id": "c{depth}", "data": {{"x": {nest(depth, "1", kind)}}}}}'
        assert app.post_signed(raw.encode()).status_code == status, depth


non_json = st.one_of(
    st.binary(max_size=300),
    st.just(b""),
    st.sampled_from([b" ", b"\n", b"NaN", b"Infinity", b"-Infinity", b"{", b'{"a":1,}', b"\xff"]),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),
    # UTF-8 bytes that are not valid UTF-8 inside an otherwise fine object.
    st.just(b'{"event": "sync_end", "connector_id": "c", "x": "\xc3\x28"}'),
)


def test_non_json_and_non_objects_are_400_and_record_nothing(app: InProcessReceiver) -> None:
    @hostile(150)
    @given(raw=non_json)
    def refused(raw: bytes) -> None:
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):
            parsed = None
        # The rare binary that is a JSON object belongs to the other properties.
        assume(not isinstance(parsed, dict))
        response = app.post_signed(raw)
        assert response.status_code == 400, response.text
        assert app.rows() == {}

    refused()


def test_test_event_is_200_and_never_recorded(app: InProcessReceiver) -> None:
    @hostile(60)
    @given(body=st.dictionaries(any_text, json_values, max_size=6))
    def connectivity_check(body: dict[str, Any]) -> None:
        body["event"] = "test_event"  # whatever else the body holds, placeholders included
        response = app.post_signed(json.dumps(body).encode())
        assert response.status_code == 200, response.text
        assert response.json() == {"accepted": False, "reason": "test_event"}
        assert app.rows() == {}

    connectivity_check()


# --- signatures ------------------------------------------------------------------------------

hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@st.composite
def wrong_signatures(draw: st.DrawFn, body: bytes) -> list[tuple[str | bytes, str | bytes]]:
    """Headers that do not carry a valid signature of ``body`` (or carry none)."""
    right = sign(body)
    kind = draw(
        st.sampled_from(
            [
                "missing",
                "blank",
                "text",
                "bytes",
                "hex",
                "other secret",
                "other body",
                "one char",
                "truncated",
                "extended",
                "prefixed",
                "wrong name",
            ]
        )
    )
    value: str | bytes
    name: str = SIGNATURE_HEADER
    if kind == "missing":
        return [("Content-Type", "application/json")]
    if kind == "blank":
        value = draw(st.sampled_from(["", " ", "\t", "  \t "]))
    elif kind == "text":
        value = draw(st.text(alphabet=st.characters(max_codepoint=255), max_size=100))
    elif kind == "bytes":
        value = draw(st.binary(max_size=100))
    elif kind == "hex":
        value = draw(hex64)
    elif kind == "other secret":
        secret = draw(
            st.sampled_from([SECRET.upper(), SECRET + " ", SECRET[:-1], "", " " + SECRET])
            | st.text(min_size=1, max_size=30)
        )
        value = sign(body, secret)
    elif kind == "other body":
        other = draw(st.binary(max_size=100))
        value = sign(other)
    elif kind == "one char":
        i = draw(st.integers(0, 63))
        replacement = draw(st.sampled_from("0123456789abcdef").filter(lambda c: c != right[i]))
        value = right[:i] + replacement + right[i + 1 :]
    elif kind == "truncated":
        value = right[: draw(st.integers(0, 63))]
    elif kind == "extended":
        value = right + draw(st.text(alphabet="0123456789abcdefABCDEF", min_size=1, max_size=8))
    elif kind == "prefixed":
        value = draw(st.sampled_from(["sha256=", "SHA256=", "v1=", "0x"])) + right
    else:
        # The right digest under a header name that is not the signature header.
        name = draw(
            st.sampled_from(
                [
                    "X-Fivetran-Signature",
                    "X-Fivetran-Signature-512",
                    "X-Fivetran-Signature-2566",
                    "X_Fivetran_Signature_256",
                    "Fivetran-Signature-256",
                    "Signature",
                ]
            )
        )
        value = right
    if name == SIGNATURE_HEADER:
        # What the receiver reads: the octets as latin-1, stripped, lower-cased.
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        assume(text.strip().lower() != right)
    return [(name, value)]


def test_requests_without_a_valid_signature_are_401_and_record_nothing(
    app: InProcessReceiver,
) -> None:
    body_bytes = (
        valid_bodies().map(lambda b: json.dumps(b).encode())
        | st.binary(max_size=200)
        | st.just(b"")
    )

    @hostile(250)
    @given(data=st.data(), raw=body_bytes)
    def unauthenticated(data: st.DataObject, raw: bytes) -> None:
        headers = data.draw(wrong_signatures(raw))
        response = app.post(raw, headers)
        assert response.status_code == 401, response.text
        assert SIGNATURE_HEADER in response.json()["error"]
        # The reply names the problem, never the digest that would have been right.
        assert sign(raw) not in response.text
        assert app.rows() == {}

    unauthenticated()


@st.composite
def mutations(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` with a byte flipped, inserted or removed, truncated or extended; never equal."""
    kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "extend", "reformat"]))
    i = draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        mutated = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1 :]
    elif kind == "insert":
        mutated = raw[:i] + draw(st.binary(min_size=1, max_size=4)) + raw[i:]
    elif kind == "delete":
        mutated = raw[:i] + raw[i + 1 :]
    elif kind == "truncate":
        mutated = raw[:i]
    elif kind == "extend":
        mutated = raw + draw(st.sampled_from([b" ", b"\n", b"}", b"\x00"]) | st.binary(min_size=1))
    else:
        # Same JSON document, other bytes: the signature covers bytes, not meaning.
        mutated = json.dumps(json.loads(raw), indent=1).encode()
    assume(mutated != raw)
    return mutated


def test_a_signed_body_changed_in_transit_is_401_and_records_nothing(
    app: InProcessReceiver,
) -> None:
    @hostile(200)
    @given(body=valid_bodies(), data=st.data())
    def tampered(body: dict[str, Any], data: st.DataObject) -> None:
        raw = json.dumps(body).encode()
        mutated = data.draw(mutations(raw))
        response = app.post(mutated, [(SIGNATURE_HEADER, sign(raw))])
        assert response.status_code == 401, response.text
        assert app.rows() == {}

    tampered()


def random_case(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flags: "".join(
            c.upper() if f else c.lower() for c, f in zip(name, flags, strict=True)
        )
    )


def test_header_casing_duplicates_and_noise(app: InProcessReceiver) -> None:
    """Header names are case-insensitive (HTTP), hex case and surrounding whitespace are
    ignored (Fivetran has sent upper-case hex), other headers do not matter; with several
    signature headers a request is recorded only if one of them is right, and refused when
    none is."""

    @hostile(150)
    @given(
        body=valid_bodies(),
        name=random_case(SIGNATURE_HEADER),
        values=st.lists(
            st.tuples(
                st.booleans(),  # right or wrong
                st.sampled_from([str.lower, str.upper]),
                st.sampled_from(["", " ", "\t", "  "]),
            ),
            min_size=1,
            max_size=3,
        ),
        noise=st.lists(
            st.tuples(
                st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True),
                st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
            ),
            max_size=4,
        ),
        content_type=st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]
        ),
    )
    def headers_vary(
        body: dict[str, Any],
        name: str,
        values: list[tuple[bool, Callable[[str], str], str]],
        noise: list[tuple[str, bytes]],
        content_type: str,
    ) -> None:
        assume(body["event"] != "test_event")
        raw = json.dumps(body).encode()
        right, wrong = sign(raw), sign(raw, "not-the-secret")
        headers: list[tuple[str | bytes, str | bytes]] = [
            (name, pad + case(right if ok else wrong) + pad) for ok, case, pad in values
        ]
        headers += [(n, v) for n, v in noise if n.lower() != SIGNATURE_HEADER.lower()]
        if content_type:
            headers.append(("Content-Type", content_type))
        before = app.rows()
        response = app.post(raw, headers)
        assert response.status_code in (202, 401), response.text
        recorded = set(app.rows()) - set(before)
        if not any(ok for ok, _, _ in values):
            assert response.status_code == 401
        if all(ok for ok, _, _ in values):
            assert response.status_code == 202
        if response.status_code == 401:
            assert not recorded
        else:
            assert any(ok for ok, _, _ in values)
            assert recorded <= {response.json()["event_id"]}

    headers_vary()


# --- size --------------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid webhook body of exactly ``size`` bytes (JSON allows trailing whitespace), so a
    missing limit would show up as a 202, not as a parse error."""
    core = json.dumps(
        {"event": "sync_end", "connector_id": "big", "sync_id": f"s{size}", "data": {}}
    ).encode()
    return core + b" " * (size - len(core))


def test_bodies_over_the_limit_are_413_however_they_arrive(app: InProcessReceiver) -> None:
    @hostile(60)
    @given(
        over=st.integers(-64, 300_000),
        delivery=st.sampled_from(["length", "lying length", "chunked", "huge declared"]),
        signed=st.booleans(),
        expect_continue=st.booleans(),
        chunk=st.integers(1_000, 200_000),
    )
    def sized(over: int, delivery: str, signed: bool, expect_continue: bool, chunk: int) -> None:
        raw = padded(MAX_BODY_BYTES + over)
        headers: list[tuple[str | bytes, str | bytes]] = [
            (SIGNATURE_HEADER, sign(raw) if signed else "0" * 64)
        ]
        if expect_continue:
            headers.append(("Expect", "100-continue"))
        content: bytes | Callable[[], AsyncIterator[bytes]] = raw
        if delivery == "lying length":
            headers.append(("Content-Length", "100"))  # smaller than what follows
        elif delivery == "huge declared":
            headers.append(("Content-Length", str(MAX_BODY_BYTES + 1)))
        elif delivery == "chunked":

            async def stream() -> AsyncIterator[bytes]:
                for start in range(0, len(raw), chunk):
                    yield raw[start : start + chunk]

            content = stream  # no Content-Length at all: Transfer-Encoding: chunked
        before = app.rows()
        response = app.post(content, headers)
        too_large = len(raw) > MAX_BODY_BYTES or delivery == "huge declared"
        if too_large:
            assert response.status_code == 413, response.text
            assert app.rows() == before
        else:
            assert response.status_code == (202 if signed else 401), response.text

    sized()


# --- deduplication -----------------------------------------------------------------------------

deliveries = st.tuples(
    st.integers(0, 2),  # connector
    st.integers(0, 2),  # sync
    st.sampled_from(
        [
            ("sync_start", None),
            ("sync_end", "SUCCESSFUL"),
            ("sync_end", "FAILURE"),
            ("sync_end", "FAILURE_WITH_TASK"),
            ("sync_end", None),
            ("resync_connector", None),
        ]
    ),
    st.text(max_size=12),  # connector_name: descriptive, must not split a key
    st.booleans(),  # send "created" or not: must not split a key either
)


def test_one_outbox_row_per_distinct_event_and_replays_add_nothing(tmp_path: Path) -> None:
    """For valid signed bodies: exactly one row per distinct (connector, sync, Prefect event
    name), whatever the order, the descriptive fields or how often each is delivered; a replay of
    the very same signed request is acknowledged as a duplicate."""

    @hostile(100)
    @given(
        sent=st.lists(deliveries, min_size=1, max_size=12),
        replays=st.lists(st.integers(0, 11), max_size=8),
        data=st.data(),
    )
    def dedupe(
        sent: list[tuple[int, int, tuple[str, str | None], str, bool]],
        replays: list[int],
        data: st.DataObject,
    ) -> None:
        requests: list[tuple[bytes, tuple[str, str, str]]] = []
        for i, (connector, sync, (event, status), name, with_created) in enumerate(sent):
            body: dict[str, Any] = {
                "event": event,
                "connector_id": f"conn_{connector}",
                "connector_name": name,
                "sync_id": f"sync-{connector}-{sync}",
            }
            if with_created:
                body["created"] = (
                    datetime(2026, 5, 22, tzinfo=UTC) + timedelta(hours=i)
                ).isoformat()
            if status is not None:
                body["data"] = {"status": status}
            key = (body["connector_id"], body["sync_id"], expected_event_name(body))
            requests.append((json.dumps(body).encode(), key))
        requests += [requests[i % len(requests)] for i in replays]
        order = data.draw(st.permutations(range(len(requests))))
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            fresh = InProcessReceiver(Path(folder) / "outbox.sqlite3")
            try:
                seen: set[tuple[str, str, str]] = set()
                for i in order:
                    raw, key = requests[i]
                    response = fresh.post_signed(raw)
                    assert response.status_code == 202, response.text
                    assert response.json()["duplicate"] is (key in seen)
                    seen.add(key)
                rows = fresh.rows()
            finally:
                fresh.close()
        stored = [
            (
                e["resource"]["fivetran.connector_id"],
                e["resource"]["fivetran.sync_id"],
                e["event"],
            )
            for e in rows.values()
        ]
        assert sorted(stored) == sorted(seen)

    dedupe()


# --- only the outbox is forwarded ----------------------------------------------------------------


def test_only_validly_signed_events_reach_the_prefect_api(app: InProcessReceiver) -> None:
    """The forwarder sends the outbox and nothing else: after a mixed barrage, the events that
    reach a fake ``POST /events`` are exactly those of the validly signed, well-formed bodies."""
    good = [
        {"event": "sync_end", "connector_id": f"good_{i}", "sync_id": "s", "data": {}}
        for i in range(3)
    ]
    hostile = [
        (json.dumps({**good[0], "connector_id": "forged"}).encode(), None),
        (json.dumps({**good[0], "connector_id": "forged2"}).encode(), "0" * 64),
        (json.dumps({**good[0], "connector_id": "x; drop table raw.events; --"}).encode(), "sign"),
        (b"not json", "sign"),
        (padded(MAX_BODY_BYTES + 1), "sign"),
    ]
    accepted = set()
    for body in good:
        response = app.post_signed(json.dumps(body).encode())
        assert response.status_code == 202
        accepted.add(response.json()["event_id"])
    for raw, signature in hostile:
        headers: list[tuple[str | bytes, str | bytes]] = []
        if signature is not None:
            headers.append((SIGNATURE_HEADER, sign(raw) if signature == "sign" else signature))
        assert app.post(raw, headers).status_code in (400, 401, 413)

    sent: list[dict[str, Any]] = []

    def prefect_events_api(request: httpx.Request) -> httpx.Response:
        sent.extend(strict_json(request.content))
        return httpx.Response(204)

    with respx.mock(assert_all_called=True) as fake:
        fake.post(f"{API}/events").mock(side_effect=prefect_events_api)
        assert app.forward() == 3
    assert {event["id"] for event in sent} == accepted == set(app.rows())
    assert {event["resource"]["fivetran.connector_id"] for event in sent} == {
        "good_0",
        "good_1",
        "good_2",
    }


# --- constant-time comparison --------------------------------------------------------------------


class DigestComparisons:
    """Stands in for ``hmac.compare_digest`` (and delegates to it), remembering each call."""

    def __init__(self) -> None:
        self.real = hmac.compare_digest
        self.calls: list[tuple[Any, Any, bool]] = []

    def __call__(self, a: Any, b: Any) -> bool:
        result = self.real(a, b)
        self.calls.append((a, b, result))
        return result


@pytest.fixture
def comparisons(monkeypatch: pytest.MonkeyPatch) -> DigestComparisons:
    recorder = DigestComparisons()
    # postload.fivetran.webhook calls hmac.compare_digest through the module attribute.
    monkeypatch.setattr(hmac, "compare_digest", recorder)
    return recorder


BODY = json.dumps({"event": "sync_end", "connector_id": "timing", "sync_id": "s1"}).encode()


@pytest.mark.parametrize(
    ("header", "valid"),
    [
        (sign(BODY), True),
        (sign(BODY).upper(), True),
        ("f" + sign(BODY)[1:] if sign(BODY)[0] != "f" else "e" + sign(BODY)[1:], False),
        (sign(BODY)[:-1] + ("0" if sign(BODY)[-1] != "0" else "1"), False),
        (sign(BODY, "another-secret"), False),
    ],
    ids=["right", "right-upper", "first-char-off", "last-char-off", "other-secret"],
)
def test_signatures_are_compared_with_compare_digest(
    comparisons: DigestComparisons, header: str, valid: bool
) -> None:
    assert verify_signature(BODY, header, SECRET) is valid
    # Exactly one comparison, of the whole digest, whose answer is the verdict: the decision
    # is compare_digest's, not an early-exit string comparison's.
    assert len(comparisons.calls) == 1
    a, b, result = comparisons.calls[0]
    assert result is valid
    assert {a, b} >= {header.lower()}
    assert sign(BODY) in {a, b}


def test_the_receiver_decides_through_compare_digest(
    app: InProcessReceiver, comparisons: DigestComparisons
) -> None:
    wrong = sign(BODY, "another-secret")
    assert app.post(BODY, [(SIGNATURE_HEADER, wrong)]).status_code == 401
    assert [result for _, _, result in comparisons.calls] == [False]
    assert app.post_signed(BODY).status_code == 202
    assert [result for _, _, result in comparisons.calls] == [False, True]


def test_read_only_outbox_answers_503_then_accepts_the_retry(app: InProcessReceiver) -> None:
    first = _sync_end("conn_ro_1")
    assert app.post_signed(first).status_code == 202
    # What SQLite answers for a read-only file or file system ("attempt to write a readonly
    # database"), through the same connection the receiver writes with.
    app.receiver.outbox._db.execute("pragma query_only = on")
    second = _sync_end("conn_ro_2")
    refused = app.post_signed(second)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "60"
    assert app.get("/healthz").json()["status"] == "degraded"
    app.receiver.outbox._db.execute("pragma query_only = off")
    retried = app.post_signed(second)  # Fivetran delivers it again
    assert retried.status_code == 202
    assert app.get("/healthz").json()["status"] == "ok"
    assert len(app.rows()) == 2


def _sync_end(connector_id: str) -> bytes:
    return json.dumps(
        {
            "event": "sync_end",
            "created": "2026-12-04T10:00:00.000Z",
            "connector_type": "postgres",
            "connector_id": connector_id,
            "sync_id": f"sync-{connector_id}",
            "data": {"status": "SUCCESSFUL"},
        }
    ).encode()
