from __future__ import annotations

import pytest

from postload.config import PipelineConfig
from postload.load import LoadOutcome, LoadVerificationError, rejects_table, verify_load
from postload.report import artifact_key, render_text_table
from postload.warehouse import FileLoadResult, LoadStatus

EVENTS = PipelineConfig.model_validate(
    {"sources": [{"name": "events", "raw_table": "events", "stage": "events"}]}
).source("events")


def result(file: str, parsed: int, loaded: int, line: int | None = None) -> FileLoadResult:
    status = (
        LoadStatus.LOADED
        if parsed == loaded
        else LoadStatus.LOAD_FAILED
        if loaded == 0
        else LoadStatus.PARTIALLY_LOADED
    )
    return FileLoadResult(
        file,
        status,
        parsed,
        loaded,
        parsed - loaded,
        "Error parsing JSON: Expecting value at column 1" if line else None,
        line,
    )


def test_no_new_files_is_quiet_and_skips_transform() -> None:
    verdict = verify_load(EVENTS, [])
    assert verdict.outcome is LoadOutcome.NO_NEW_FILES
    assert not verdict.should_transform
    assert "no new files" in verdict.summary()


def test_clean_load_transforms() -> None:
    verdict = verify_load(EVENTS, [result("a.jsonl", 10, 10)])
    assert verdict.outcome is LoadOutcome.LOADED
    assert verdict.should_transform and verdict.rows_loaded == 10
    assert rejects_table(verdict) == []


def test_rejected_lines_succeed_but_are_surfaced() -> None:
    verdict = verify_load(EVENTS, [result("a.jsonl", 10, 10), result("b.jsonl", 10, 7, line=3)])
    assert verdict.outcome is LoadOutcome.LOADED_WITH_REJECTS
    assert verdict.rows_rejected == 3
    assert rejects_table(verdict) == [
        {
            "file": "b.jsonl",
            "status": "PARTIALLY_LOADED",
            "rows_parsed": 10,
            "rows_loaded": 7,
            "rejected": 3,
            "first_error_line": 3,
            "first_error": "Error parsing JSON: Expecting value at column 1",
        }
    ]
    assert "rejected 3 malformed line(s) in 1 file(s)" in verdict.summary()


def test_files_present_but_zero_rows_loaded_fails_clearly() -> None:
    with pytest.raises(LoadVerificationError) as err:
        verify_load(EVENTS, [result("bad.jsonl", 4, 0, line=1)])
    message = str(err.value)
    assert "1 file(s) were staged but 0 rows loaded into events" in message
    assert "bad.jsonl: LOAD_FAILED, 4 of 4 line(s) rejected, first error at line 1" in message


def test_text_table_renders_none_as_blank() -> None:
    text = render_text_table([{"source": "events", "rows": 3, "status": None}])
    assert text.splitlines()[0].split() == ["source", "rows", "status"]
    assert text.splitlines()[2].split() == ["events", "3"]


def test_artifact_keys_are_valid() -> None:
    assert artifact_key("load-rejects", "Raw_Events") == "load-rejects-raw-events"
