"""Generated pipeline configs against the real loader (``load_pipeline_config``).

Whatever the file holds, loading it gives a valid ``PipelineConfig`` or a ``ConfigError`` whose
message names the file (and, for a broken key, that key); never another exception type, which
would surface as a traceback instead of a message saying what to fix. Documents are generated as
data (valid ones, and valid ones with one thing broken) and as raw text and bytes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from postload.config import (
    ConfigError,
    FivetranLoader,
    FullRunConfig,
    PipelineConfig,
    Selection,
    SourceConfig,
    load_pipeline_config,
)
from tests.conftest import hostile

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


class ConfigFile:
    """One config file in its own folder; the name has a space and non-ASCII on purpose, since
    the message must name the file exactly."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "pipeline cönfig.yaml"

    def load(self, content: str | bytes | dict[str, Any]) -> PipelineConfig | ConfigError:
        if isinstance(content, dict):
            content = yaml.safe_dump(content, allow_unicode=True, sort_keys=False)
        if isinstance(content, str):
            content = content.encode("utf-8")
        self.path.write_bytes(content)
        try:
            return load_pipeline_config(self.path)
        except ConfigError as exc:
            assert str(self.path) in str(exc), str(exc)[:2000]
            return exc


@pytest.fixture
def config_file(tmp_path: Path) -> Iterator[ConfigFile]:
    yield ConfigFile(tmp_path)


# --- valid documents ---------------------------------------------------------------------------


def fresh(value: Any) -> st.SearchStrategy[Any]:
    """``st.just`` for a container: a new copy per example, since documents are edited in place
    (st.just would hand every example the same object, edits of earlier ones included)."""
    return st.just(value).map(copy.deepcopy)


identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True)
selection_words = st.from_regex(r"[A-Za-z0-9_.:*+@/,][A-Za-z0-9_.:*+@/,\-]{0,20}", fullmatch=True)
selections = st.one_of(
    st.lists(selection_words, min_size=1, max_size=4).map(lambda w: {"select": " ".join(w)}),
    identifiers.map(lambda t: {"tag": t}),
    identifiers.map(lambda s: {"selector": s}),
)
loaders = st.one_of(
    fresh({"type": "copy"}),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,49}", fullmatch=True).map(
        lambda c: {"type": "fivetran", "connector_id": c}
    ),
)
durations = st.one_of(
    st.integers(1, 10**6),
    st.tuples(st.integers(1, 10**5), st.sampled_from(["m", "min", "h", "d"])).map(
        lambda t: f"{t[0]}{t[1]}"
    ),
)


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(identifiers, min_size=1, max_size=4, unique=True))
    sources = []
    for name in names:
        source: dict[str, Any] = {
            "name": name,
            "raw_table": draw(identifiers),
            "stage": draw(identifiers),
        }
        optional = {
            "file_format": st.just("json"),
            "loader": loaders,
            "dbt_source": identifiers,
            "selection": selections,
            "dbt_cloud_job_id": st.integers(1, 2**40),
            "loaded_at_field": identifiers,
        }
        for key, values in optional.items():
            if draw(st.booleans()):
                source[key] = draw(values)
        sources.append(source)
    config: dict[str, Any] = {"sources": sources}
    for key, values in {
        "version": st.just(1),
        "raw_schema": identifiers,
        "ops_schema": identifiers,
    }.items():
        if draw(st.booleans()):
            config[key] = draw(values)
    if draw(st.booleans()):
        full_run: dict[str, Any] = {}
        if draw(st.booleans()):
            full_run["sources"] = draw(st.lists(st.sampled_from(names), unique=True))
        for key in ("stale_after", "alert_after"):
            if draw(st.booleans()):
                full_run[key] = draw(st.dictionaries(st.sampled_from(names), durations))
        if draw(st.booleans()):
            full_run["dbt_cloud_job_id"] = draw(st.integers(1, 2**40))
        config["full_run"] = full_run
    return config


def test_valid_documents_load(tmp_path: Path) -> None:
    files = ConfigFile(tmp_path)

    @hostile(200)
    @given(config=valid_configs())
    def loads(config: dict[str, Any]) -> None:
        result = files.load(config)
        assert isinstance(result, PipelineConfig), str(result)
        assert result.source_names == [s["name"] for s in config["sources"]]
        for source in result.sources:
            for name in (source.name, source.raw_table, source.stage, source.loaded_at_field):
                assert IDENTIFIER.fullmatch(name)
            args = source.effective_selection.cli_args()
            # Two argv elements: the option, and a value that cannot be read as an option.
            assert len(args) == 2 and args[0] in ("--select", "--selector")
            assert not any(word.startswith("-") for word in args[1].split())

    loads()


# --- one thing broken --------------------------------------------------------------------------

huge_text = st.tuples(st.text(min_size=1, max_size=20), st.integers(300, 20_000)).map(
    lambda t: (t[0] * t[1])[: t[1]]
)
non_identifiers = st.one_of(
    st.text(max_size=40).filter(lambda t: IDENTIFIER.fullmatch(t) is None),
    huge_text.filter(lambda t: IDENTIFIER.fullmatch(t) is None),
    st.sampled_from(["1events", "raw.events", "events;", "ev ents", "é", "events\n", ""]),
)


def nested(depth: int, kind: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


wrong_type_values = st.one_of(
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    # Deep enough to matter to a validator; deeper ones are raw text below (safe_dump recurses).
    st.tuples(st.integers(1, 60), st.sampled_from(["list", "dict"])).map(lambda t: nested(*t)),
    st.none(),
)
# Text no int, float or literal 1 reads (pydantic takes "+1", "1_0", " 1", "1.0" as ints).
not_a_number = st.from_regex(r"[A-Za-z][A-Za-z ;']{0,19}", fullmatch=True)
# key -> values that key never accepts
BROKEN_SOURCE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": non_identifiers | wrong_type_values,
    "raw_table": non_identifiers | wrong_type_values,
    "stage": non_identifiers | wrong_type_values,
    "dbt_source": non_identifiers | wrong_type_values.filter(lambda v: v is not None),
    "loaded_at_field": non_identifiers | wrong_type_values,
    "file_format": st.text(max_size=20).filter(lambda t: t != "json") | wrong_type_values,
    "dbt_cloud_job_id": st.integers(-(10**30), 0)
    | not_a_number
    | st.lists(st.integers(), max_size=2),
    "loader": st.one_of(
        st.fixed_dictionaries(
            {"type": st.text(max_size=10).filter(lambda t: t not in ("copy", "fivetran"))}
        ),
        fresh({"type": "fivetran"}),
        st.fixed_dictionaries(
            {
                "type": st.just("fivetran"),
                "connector_id": st.text(max_size=30).filter(
                    lambda t: re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,199}", t) is None
                ),
            }
        ),
        wrong_type_values.filter(lambda v: v is not None),
    ),
    "selection": st.one_of(
        fresh({}),
        fresh({"tag": "a", "selector": "b"}),
        st.fixed_dictionaries({"tag": non_identifiers}),
        st.fixed_dictionaries({"selector": non_identifiers}),
        st.fixed_dictionaries(
            {
                "select": st.text(max_size=40).filter(
                    lambda t: re.fullmatch(r"[A-Za-z0-9_.:*+@/,\- ]+", t) is None
                )
            }
        ),
        # Selection syntax, but a word that dbt would read as an option.
        st.tuples(selection_words, st.sampled_from(["--full-refresh", "-x", "--target prod"])).map(
            lambda t: {"select": f"{t[0]} {t[1]}"}
        ),
        wrong_type_values.filter(lambda v: v is not None),
    ),
}
BROKEN_TOP_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "version": st.integers(2, 10**6) | not_a_number | st.just(0),
    "raw_schema": non_identifiers | wrong_type_values,
    "ops_schema": non_identifiers | wrong_type_values,
    "sources": fresh([]) | wrong_type_values.filter(lambda v: not isinstance(v, list)),
    "full_run": st.one_of(
        st.fixed_dictionaries({"sources": st.lists(identifiers, min_size=1)}),
        st.fixed_dictionaries({"stale_after": st.dictionaries(identifiers, durations, min_size=1)}),
        st.fixed_dictionaries({"dbt_cloud_job_id": st.integers(-(10**30), 0) | not_a_number}),
        st.fixed_dictionaries({"sourcez": st.lists(identifiers)}),  # misspelt
        # Anything but a mapping ({} is a valid full_run: every default).
        wrong_type_values.filter(lambda v: v is not None and not isinstance(v, dict)),
    ),
}


# Every key the config documents, at any level: an "unknown" key is none of these.
KNOWN_KEYS = {
    *PipelineConfig.model_fields,
    *SourceConfig.model_fields,
    *FullRunConfig.model_fields,
    *Selection.model_fields,
    *FivetranLoader.model_fields,
}


@st.composite
def broken_configs(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid document with one thing broken, and the key the error must name."""
    config = draw(valid_configs())
    source = config["sources"][0]
    where = draw(st.sampled_from(["source key", "top key", "unknown key", "duplicate"]))
    if where == "source key":
        key = draw(st.sampled_from(sorted(BROKEN_SOURCE_VALUES)))
        source[key] = draw(BROKEN_SOURCE_VALUES[key])
        # A Fivetran source may name its raw_table without a stage (Fivetran writes the table).
        if key == "stage" and source[key] is None:
            assume(source.get("loader", {}).get("type") != "fivetran")
    elif where == "top key":
        key = draw(st.sampled_from(sorted(BROKEN_TOP_VALUES)))
        config[key] = draw(BROKEN_TOP_VALUES[key])
        if key == "full_run" and isinstance(config[key], dict):
            # A full_run naming a source that is declared would be valid.
            names = {s["name"] for s in config["sources"]}
            for listed in (config[key].get("sources"), config[key].get("stale_after")):
                assume(not listed or not set(listed) <= names)
    elif where == "unknown key":
        key = draw(st.text(min_size=1, max_size=30).filter(lambda k: k not in KNOWN_KEYS))
        # The key the file holds: PyYAML writes e.g. U+0085 raw in a quoted key, and reading it
        # back folds that line break into a space, so the error names " ".
        assume(yaml.safe_load(yaml.safe_dump({key: 0}, allow_unicode=True)) == {key: 0})
        target = draw(st.sampled_from(["top", "source", "loader", "selection", "full_run"]))
        holder = {
            "top": config,
            "source": source,
            "loader": source.setdefault("loader", {"type": "copy"}),
            "selection": source.setdefault("selection", {"tag": "x"}),
            "full_run": config.setdefault("full_run", {}),
        }[target]
        holder[key] = draw(wrong_type_values | st.text(max_size=10))
    else:
        config["sources"].append(dict(source))
        key = "declared twice"
    return config, key


def test_broken_documents_raise_config_error_naming_file_and_key(tmp_path: Path) -> None:
    files = ConfigFile(tmp_path)

    @hostile(400)
    @given(case=broken_configs())
    def refused(case: tuple[dict[str, Any], str]) -> None:
        config, key = case
        result = files.load(config)
        assert isinstance(result, ConfigError), f"accepted: {config!r}"[:2000]
        assert key in str(result), str(result)[:2000]

    refused()


# --- raw text and bytes --------------------------------------------------------------------------

yaml_fragments = st.sampled_from(
    [
        "sources:",
        "  - name: events",
        "    raw_table: events",
        "    stage: events",
        "full_run: {stale_after: {events: 2h}}",
        "version: 1",
        "- ",
        ": ",
        "&a [*a]",
        "*a",
        "!!python/object:os.system [echo]",
        "!!binary aGVsbG8=",
        "2024-13-45",
        "0x" + "f" * 40,
        "1" * 5000,
        "---",
        "...",
        "\t",
        "? [1, 2]",
        "<<: *a",
        "%YAML 1.1",
        '"\\ud800"',
        "\x00",
        "\ufeff",
    ]
)
raw_documents = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    st.lists(yaml_fragments | st.text(max_size=20), max_size=12).map("\n".join),
    # Nested far past what a recursive parser survives.
    st.tuples(st.integers(1, 20_000), st.sampled_from(["[", "{a: ", "- "])).map(
        lambda t: "sources:\n" + t[1] * t[0] + "x"
    ),
    # A valid document with random bytes spliced in.
    st.tuples(valid_configs(), st.binary(min_size=1, max_size=8), st.integers(0, 10_000)).map(
        lambda t: _splice(yaml.safe_dump(t[0]).encode(), t[1], t[2])
    ),
)


def _splice(document: bytes, insert: bytes, at: int) -> bytes:
    at %= len(document) + 1
    return document[:at] + insert + document[at:]


def test_any_bytes_give_a_config_or_a_config_error(tmp_path: Path) -> None:
    files = ConfigFile(tmp_path)

    @hostile(300)
    @given(content=raw_documents)
    def loads_or_refuses(content: str | bytes) -> None:
        # The only outcomes: ConfigFile.load returns one of these or the test fails with the
        # escaped exception.
        assert isinstance(files.load(content), PipelineConfig | ConfigError)

    loads_or_refuses()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"sources: \xff\xfe", "not UTF-8"),
        ("sources: " + "[" * 20_000 + "]" * 20_000, "nested too deeply"),
        ("sources: " + "{a: " * 5_000 + "1" + "}" * 5_000, "nested too deeply"),
        (
            "sources: [{name: a, raw_table: a, stage: a, dbt_cloud_job_id: " + "9" * 5000 + "}]",
            "4300",
        ),
        ("sources: [{name: a, raw_table: a, stage: a}]\nwhen: 2024-13-45\n", "month"),
        (
            "sources: [{name: a, raw_table: a, stage: a, selection: {select: 'a --full-refresh'}}]",
            "selection.select",
        ),
        (
            "sources: [{name: a, raw_table: a, stage: a, selection: {select: '   '}}]",
            "selection.select",
        ),
    ],
    ids=[
        "not-utf8",
        "deep-lists",
        "deep-maps",
        "int-over-4300-digits",
        "impossible-date",
        "option-in-select",
        "blank-select",
    ],
)
def test_former_escapes_are_config_errors(
    config_file: ConfigFile, content: str | bytes, says: str
) -> None:
    """Each of these escaped as UnicodeDecodeError, RecursionError or ValueError, or (the last
    two) loaded, before the loader and the selection check were fixed."""
    result = config_file.load(content)
    assert isinstance(result, ConfigError)
    assert says in str(result)


# --- durations -----------------------------------------------------------------------------------

duration_values = st.one_of(
    st.integers(-(10**40), 10**40),
    st.tuples(
        st.integers(-(10**30), 10**30), st.sampled_from(["m", "min", "h", "d", "s", "", " h"])
    ).map(lambda t: f"{t[0]}{t[1]}"),
    st.text(max_size=12),
    st.floats(),
    st.booleans(),
)


def test_any_duration_gives_a_config_or_an_error_naming_it(tmp_path: Path) -> None:
    """Durations are the one config value turned into another type by hand (timedelta), which
    raised OverflowError past 999999999 days."""
    files = ConfigFile(tmp_path)

    @hostile(150)
    @given(value=duration_values, key=st.sampled_from(["stale_after", "alert_after"]))
    def duration(value: Any, key: str) -> None:
        config = {
            "sources": [{"name": "events", "raw_table": "events", "stage": "events"}],
            "full_run": {key: {"events": value}},
        }
        result = files.load(config)
        if isinstance(result, ConfigError):
            assert f"full_run.{key}.events" in str(result)
        else:
            assert result.full_run.model_dump()[key]["events"].total_seconds() > 0

    duration()
