"""The suite-wide secret scan (tests/conftest.py) fails a test whose output shows a secret, except
on the lines a marker names as a library's known leak of that one secret."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

pytest_plugins = ["pytester"]

LEAKY_TESTS = """
import logging, os, sys
import pytest
from tests.conftest import suite_secret

TOKEN = suite_secret("example token", "tok-" + "scan-canary-93f1")

def test_prints_it():
    print("connecting with", TOKEN)

def test_logs_it():
    logging.getLogger("x").warning("auth header %s", TOKEN)

def test_raises_with_it():
    raise RuntimeError(f"bad credentials {TOKEN}")

def test_a_child_process_writes_it():
    os.system(f"{sys.executable} -c 'import sys; sys.stderr.write(\\"{TOKEN}\\")'")

def test_keeps_it_to_itself():
    assert TOKEN.startswith("tok-")

@pytest.mark.upstream_secret_leak(name="example token", line=r"^libx: GET ", reason="libx")
def test_a_known_library_line_is_exempt():
    print(f"libx: GET https://example.invalid/{TOKEN}")

@pytest.mark.upstream_secret_leak(name="example token", line=r"^libx: GET ", reason="libx")
def test_but_only_that_line():
    print(f"libx: GET https://example.invalid/{TOKEN}")
    print(f"and here {TOKEN}")
"""


def test_a_secret_in_any_captured_output_fails_the_test_by_name_not_value(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the child pytest imports tests.conftest
    result = pytester.runpytest_subprocess("-p", "tests.conftest", "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=5)
    output = result.stdout.str() + result.stderr.str()
    assert "scan-canary-93f1" not in output
    for name in (
        "test_prints_it",
        "test_logs_it",
        "test_raises_with_it",
        "test_a_child_process",
        "test_but_only_that_line",
    ):
        assert any(name in line and "example token" in line for line in result.outlines), name
