"""The README matches the code: its commands exist, its settings are real, its files are there."""

from __future__ import annotations

import re
import shlex

import pytest

from postload.config import Settings
from postload.local_stack import LOCAL_SERVER_SETTINGS
from tests.conftest import REPO
from tests.test_cli import COMMANDS

README = (REPO / "README.md").read_text()
# Fenced blocks paired in order (a closing fence is never read as an opening one); shell only.
CODE_BLOCKS = [
    body
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", README, flags=re.S | re.M)
    if lang in ("", "bash")
]
INLINE_CODE = re.findall(r"`([^`\n]+)`", README)


def _command_lines() -> list[str]:
    lines = []
    for block in CODE_BLOCKS:
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines + INLINE_CODE


def _postload_invocations() -> list[list[str]]:
    found = []
    for line in _command_lines():
        for match in re.finditer(r"(?:^|[\s(])postload ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)", line):
            found.append(match.group(1).split())
    return found


KNOWN = {" ".join(c) for c in COMMANDS}


@pytest.mark.parametrize("words", _postload_invocations(), ids=" ".join)
def test_every_postload_command_in_the_readme_exists(words: list[str]) -> None:
    # "postload plan orders": the command is the longest known prefix; arguments follow it.
    assert " ".join(words) in KNOWN or words[0] in KNOWN, f"`postload {' '.join(words)}`"


def test_every_make_target_in_the_readme_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    used = {m for line in _command_lines() for m in re.findall(r"\bmake ([a-z][a-z-]*)", line)}
    assert used, "the README names no make target"
    assert used <= targets, used - targets


def test_every_setting_in_the_readme_is_a_setting() -> None:
    documented = set(re.findall(r"\bPOSTLOAD_([A-Z_]+[A-Z])\b", README))
    fields = {name.upper() for name in Settings.model_fields}
    # Read by prefect.docker.yaml's build step where you deploy, not by postload.
    deploy_time = {"IMAGE", "IMAGE_TAG"}
    assert documented - deploy_time <= fields, documented - deploy_time - fields


def prefect_setting_names() -> set[str]:
    # Prefect's own list of the environment variables it reads (private, but what
    # `prefect config` validates against): a misspelt setting is otherwise silently ignored.
    from prefect.settings import Settings as PrefectSettings
    from prefect.settings.legacy import _get_valid_setting_names

    return set(_get_valid_setting_names(PrefectSettings))


def test_every_prefect_setting_in_the_readme_and_the_local_server_is_real() -> None:
    documented = set(re.findall(r"\bPREFECT_[A-Z_]+[A-Z]\b", README))
    assert "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE" in documented
    real = prefect_setting_names()
    assert documented <= real, documented - real
    assert set(LOCAL_SERVER_SETTINGS) <= real, set(LOCAL_SERVER_SETTINGS) - real


def test_every_layout_path_exists() -> None:
    layout = README.split("## Layout", 1)[1].split("```", 2)[1]
    for line in layout.strip().splitlines():
        name = line.split()[0] if line and not line.startswith(" ") else None
        if name:
            assert (REPO / name.rstrip("/")).exists(), name


def test_readme_demo_and_test_commands_are_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make demo" in ci
    two = CODE_BLOCKS[0]
    assert [shlex.split(line)[:2] for line in two.strip().splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]
