"""The README and the guides it links match the code: their commands exist, their settings are
real (and the settings reference is complete), their files and links are there."""

from __future__ import annotations

import re
import shlex
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import AliasChoices, AliasPath, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from postload.cli import app
from postload.config import Settings
from postload.local.stack import LOCAL_SERVER_SETTINGS
from tests.conftest import REPO
from tests.test_cli import COMMANDS

README = (REPO / "README.md").read_text()
# The guides the README links for detail. docs/performance.md is a history of measurements, whose
# commands and settings are those of their day: it is not held to today's code.
GUIDES = {
    f"docs/{path.name}": path.read_text()
    for path in sorted((REPO / "docs").glob("*.md"))
    if path.name != "performance.md"
}
DOCUMENTS = {"README.md": README, **GUIDES}

# Read by prefect.docker.yaml's build step where you deploy, not by postload.
DEPLOY_TIME_VARIABLES = {"POSTLOAD_IMAGE", "POSTLOAD_IMAGE_TAG", "POSTLOAD_VERSION"}


def _profile_variables() -> set[str]:
    """What postload sets for dbt's profile (profiles.yml reads them), not settings."""
    from postload.dbt import _invocation
    from postload.warehouse import _snowflake

    return {
        value
        for module in (_invocation, _snowflake)
        for name, value in vars(module).items()
        if name.endswith("_ENV") and isinstance(value, str) and value.startswith("POSTLOAD_")
    }


def _code_blocks(text: str) -> list[str]:
    # Fenced blocks paired in order (a closing fence is never read as an opening one); shell only.
    return [
        body
        for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)
        if lang in ("", "bash")
    ]


def _inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


CODE_BLOCKS = _code_blocks(README)


def _command_lines(text: str) -> list[str]:
    lines = []
    for block in _code_blocks(text):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines + _inline_code(text)


def _postload_invocations() -> list[tuple[str, list[str], list[str]]]:
    """(document, command words, the --options written after them on the same command line)."""
    found = []
    for name, text in DOCUMENTS.items():
        for line in _command_lines(text):
            for match in re.finditer(
                r"(?:^|[\s(])postload ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)", line
            ):
                rest = re.split(r"[|;&)]", line[match.end() :], maxsplit=1)[0]
                options = re.findall(r"(?:^|\s)(--[a-z][a-z-]*)", rest)
                found.append((name, match.group(1).split(), options))
    return found


KNOWN = {" ".join(c) for c in COMMANDS}


def _click_command(path: list[str]) -> Any:
    command = typer.main.get_command(app)
    for word in path:
        command = command.commands[word]
    return command


@pytest.mark.parametrize(
    ("document", "words", "options"),
    _postload_invocations(),
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_every_postload_command_in_the_docs_exists(
    document: str, words: list[str], options: list[str]
) -> None:
    # "postload plan orders": the command is the longest known prefix; arguments follow it.
    command = words if " ".join(words) in KNOWN else words[:1]
    assert " ".join(command) in KNOWN, f"{document}: `postload {' '.join(words)}`"
    params = _click_command(command).params
    known = {"--help"} | {o for p in params for o in [*p.opts, *p.secondary_opts]}
    unknown = [o for o in options if o not in known]
    assert not unknown, f"{document}: `postload {' '.join(command)}` has no {unknown}"


def test_every_make_target_in_the_docs_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    used = {
        m
        for text in DOCUMENTS.values()
        for line in _command_lines(text)
        for m in re.findall(r"\bmake ([a-z][a-z-]*)", line)
    }
    assert {"demo", "test"} <= used, "the README names neither `make demo` nor `make test`"
    assert used <= targets, used - targets


# --- settings ----------------------------------------------------------------------------------


def _env_names(settings: type[BaseSettings], name: str, field: FieldInfo) -> list[str]:
    """The environment variables pydantic-settings reads for one field of ``settings``.

    Without an alias it is ``env_prefix`` + the field name; an alias replaces both (the prefix is
    not added to it). Names are case-insensitive (``case_sensitive`` is off), so upper-cased.
    """
    alias = field.validation_alias if field.validation_alias is not None else field.alias
    if alias is None:
        names = [settings.model_config.get("env_prefix", "") + name]
    elif isinstance(alias, str):
        names = [alias]
    elif isinstance(alias, AliasChoices):
        names = [c if isinstance(c, str) else str(c.path[0]) for c in alias.choices]
    elif isinstance(alias, AliasPath):
        names = [str(alias.path[0])]
    else:  # pragma: no cover - a new kind of alias: teach this function about it
        raise TypeError(f"{settings.__name__}.{name}: unexpected alias {alias!r}")
    assert not settings.model_config.get("case_sensitive"), "names below are upper-cased"
    return [n.upper() for n in names]


def settings_env_vars(settings: type[BaseSettings] = Settings) -> dict[str, str]:
    """Every environment variable ``settings`` reads, mapped to its field name."""
    return {
        env: name
        for name, f in settings.model_fields.items()
        for env in _env_names(settings, name, f)
    }


def _settings_table() -> dict[str, str]:
    """The README's settings reference: each variable of its first column -> its default cell."""
    section = README.split("\n### Settings\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no settings table under '### Settings' in the README"
    table = {}
    for row in rows:
        first, default = [cell.strip() for cell in row.strip("|").split("|")][:2]
        for variable in re.findall(r"`([A-Z][A-Z0-9_]*)`", first):
            assert variable not in table, f"{variable} is listed twice"
            table[variable] = default
    return table


def test_the_settings_reference_lists_every_setting_and_only_settings() -> None:
    read = set(settings_env_vars())
    listed = set(_settings_table())
    missing, unknown = sorted(read - listed), sorted(listed - read)
    assert not missing and not unknown, (
        f"read by Settings but not in the README's reference: {missing}; "
        f"in the reference but not read by Settings: {unknown}"
    )


SENTINEL = "zz-readme-sentinel"


def _assert_read(
    settings: type[BaseSettings], env: str, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``env`` reaches ``field``: a value it accepts, or a validation error located there."""
    monkeypatch.setenv(env, SENTINEL)
    try:
        value = getattr(settings(), field)
    except ValidationError as exc:
        assert {e["loc"][0] for e in exc.errors()} & {field, env, env.lower()}, exc
        return
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    assert str(value) == SENTINEL, f"{env} did not reach {settings.__name__}.{field}"


@pytest.mark.parametrize(("env", "field"), sorted(settings_env_vars().items()))
def test_settings_reads_each_variable_the_reference_is_checked_against(
    monkeypatch: pytest.MonkeyPatch, env: str, field: str
) -> None:
    _assert_read(Settings, env, field, monkeypatch)


class _Aliased(Settings):
    """Settings with the aliases a future setting might use (renamed, or with a legacy name)."""

    renamed: str = Field("x", validation_alias="POSTLOAD_OTHER_NAME")
    legacy: str = Field("x", validation_alias=AliasChoices("postload_legacy", "OLD_LEGACY"))


def test_the_derivation_follows_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    derived = settings_env_vars(_Aliased)
    assert derived["POSTLOAD_OTHER_NAME"] == "renamed" and "POSTLOAD_RENAMED" not in derived
    assert derived["POSTLOAD_LEGACY"] == derived["OLD_LEGACY"] == "legacy"
    for env in ("POSTLOAD_OTHER_NAME", "POSTLOAD_LEGACY", "OLD_LEGACY"):
        with monkeypatch.context() as patch:
            _assert_read(_Aliased, env, derived[env], patch)


def _plain_default(field: FieldInfo) -> str | None:
    """The field's default as the reference writes it, or None when it is computed."""
    default = field.default
    if field.is_required() or field.default_factory is not None or default is None:
        return None
    if isinstance(default, Enum):
        default = default.value
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    if isinstance(default, Path):
        default = default.as_posix()
    return str(default)


def test_the_settings_reference_gives_each_default() -> None:
    table = _settings_table()
    wrong = {}
    for env, name in settings_env_vars().items():
        expected = _plain_default(Settings.model_fields[name])
        if expected is not None and env in table and table[env] != f"`{expected}`":
            wrong[env] = f"default {expected!r}, README says {table[env]}"
    assert not wrong, wrong


def test_every_setting_in_the_docs_is_a_setting() -> None:
    real = set(settings_env_vars()) | DEPLOY_TIME_VARIABLES | _profile_variables()
    for name, text in DOCUMENTS.items():
        documented = set(re.findall(r"\bPOSTLOAD_[A-Z_]+[A-Z]\b", text))
        assert documented <= real, f"{name}: {documented - real}"


def prefect_setting_names() -> set[str]:
    # Prefect's own list of the environment variables it reads (private, but what
    # `prefect config` validates against): a misspelt setting is otherwise silently ignored.
    from prefect.settings import Settings as PrefectSettings
    from prefect.settings.legacy import _get_valid_setting_names

    return set(_get_valid_setting_names(PrefectSettings))


def test_every_prefect_setting_in_the_docs_and_the_local_server_is_real() -> None:
    real = prefect_setting_names()
    documented = set()
    for name, text in DOCUMENTS.items():
        found = set(re.findall(r"\bPREFECT_[A-Z_]+[A-Z]\b", text))
        assert found <= real, f"{name}: {found - real}"
        documented |= found
    assert set(LOCAL_SERVER_SETTINGS) <= documented, set(LOCAL_SERVER_SETTINGS) - documented
    assert set(LOCAL_SERVER_SETTINGS) <= real, set(LOCAL_SERVER_SETTINGS) - real


# --- files -------------------------------------------------------------------------------------


def test_every_layout_path_exists() -> None:
    layout = README.split("## Layout", 1)[1].split("```", 2)[1]
    names = [line.split()[0] for line in layout.strip().splitlines() if not line.startswith(" ")]
    assert names
    for name in names:
        assert (REPO / name.rstrip("/")).exists(), name


def _links() -> list[tuple[str, str]]:
    return [
        (name, target)
        for name, text in DOCUMENTS.items()
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", text))
        if not re.match(r"[a-z]+:", target)
    ]


@pytest.mark.parametrize(("document", "target"), _links())
def test_every_link_leads_somewhere(document: str, target: str) -> None:
    path, _, anchor = target.partition("#")
    resolved = (REPO / document).parent / path if path else REPO / document
    assert resolved.exists(), f"{document} links {target}, which does not exist"
    if anchor and resolved.suffix == ".md":
        headings = re.findall(r"^#+ (.+)$", resolved.read_text(), flags=re.M)
        slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
        assert anchor in slugs, f"{document} links {target}: no such heading in {path or document}"


def test_readme_demo_and_test_commands_are_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make demo" in ci
    two = CODE_BLOCKS[0]
    assert [shlex.split(line)[:2] for line in two.strip().splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]
