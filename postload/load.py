"""Load verification: did the staged files load, and which lines were rejected."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from postload.config import SourceConfig
from postload.warehouse import FileLoadResult


class LoadOutcome(StrEnum):
    NO_NEW_FILES = "no_new_files"
    LOADED = "loaded"
    LOADED_WITH_REJECTS = "loaded_with_rejects"


class LoadVerificationError(RuntimeError):
    """Files were staged but nothing loaded: the data is bad, not the infrastructure."""


@dataclass(frozen=True)
class LoadVerdict:
    source: str
    outcome: LoadOutcome
    files: list[FileLoadResult] = field(default_factory=list)

    @property
    def rows_loaded(self) -> int:
        return sum(f.rows_loaded for f in self.files)

    @property
    def rows_rejected(self) -> int:
        return sum(f.errors_seen for f in self.files)

    @property
    def files_with_rejects(self) -> list[FileLoadResult]:
        return [f for f in self.files if f.errors_seen]

    @property
    def should_transform(self) -> bool:
        return self.outcome is not LoadOutcome.NO_NEW_FILES

    def summary(self) -> str:
        if self.outcome is LoadOutcome.NO_NEW_FILES:
            return f"source {self.source!r}: no new files to load; nothing to transform"
        text = f"source {self.source!r}: loaded {self.rows_loaded} row(s) from {len(self.files)} file(s)"
        if self.rows_rejected:
            text += (
                f"; rejected {self.rows_rejected} malformed line(s) in "
                f"{len(self.files_with_rejects)} file(s) (see the load-rejects artifact)"
            )
        return text


def verify_load(source: SourceConfig, results: list[FileLoadResult]) -> LoadVerdict:
    """Fail when files were present but no row loaded; otherwise say what loaded and what was rejected."""
    if not results:
        return LoadVerdict(source.name, LoadOutcome.NO_NEW_FILES)
    verdict = LoadVerdict(
        source.name,
        LoadOutcome.LOADED_WITH_REJECTS
        if any(r.errors_seen for r in results)
        else LoadOutcome.LOADED,
        list(results),
    )
    if verdict.rows_loaded == 0:
        details = "; ".join(
            f"{r.file}: {r.status.value}, {r.errors_seen} of {r.rows_parsed} line(s) rejected"
            + (
                f", first error at line {r.first_error_line}: {r.first_error}"
                if r.first_error
                else ""
            )
            for r in results
        )
        raise LoadVerificationError(
            f"source {source.name!r}: {len(results)} file(s) were staged but 0 rows loaded into "
            f"{source.raw_table} ({details}). Fix or remove the file(s); a corrected file loads "
            "on the next run."
        )
    return verdict


def rejects_table(verdict: LoadVerdict) -> list[dict[str, Any]]:
    return [
        {
            "file": f.file,
            "status": f.status.value,
            "rows_parsed": f.rows_parsed,
            "rows_loaded": f.rows_loaded,
            "rejected": f.errors_seen,
            "first_error_line": f.first_error_line,
            "first_error": f.first_error,
        }
        for f in verdict.files_with_rejects
    ]
