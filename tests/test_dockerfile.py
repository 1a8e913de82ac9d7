"""The Dockerfile, checked without a Docker engine: what it copies exists and is not ignored, the
locked dependencies are a layer of their own, it runs as a non-root user with no secrets baked in,
and the commands it starts are real postload subcommands."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml
from typer.testing import CliRunner

from postload.cli import app
from postload.config import Settings
from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CODE = {"postload", "flows", "pyproject.toml"}
SECRET_LIKE = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|KEY|CREDENTIAL|AUTH|PRIVATE|DSN")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def parse(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction is not part of it
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


INSTRUCTIONS = parse(DOCKERFILE.read_text())


def of(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword]


def copy_sources(instruction: Instruction) -> list[str]:
    words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
    return words[:-1]


def env_names(instruction: Instruction) -> list[str]:
    # `ENV A=1 B=2`, or the legacy `ENV A 1` (one variable, the rest is its value).
    words = shlex.split(instruction.arguments)
    if "=" not in words[0]:
        return [words[0]]
    return [w.split("=", 1)[0] for w in words]


def exec_form(instruction: Instruction) -> list[str]:
    return json.loads(instruction.arguments)


def index_of(predicate) -> int:
    return next(i for i, instruction in enumerate(INSTRUCTIONS) if predicate(instruction))


def test_every_copied_path_is_in_the_repo_and_in_the_build_context() -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [s for copy in of("COPY") for s in copy_sources(copy)]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repo"
        # .dockerignore matches from the context root; a match would fail the build.
        assert not [p for p in ignored if fnmatch.fnmatch(source, p)], source


def test_local_state_and_secrets_stay_out_of_the_build_context() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    for path in [".env", ".venv", ".postload", "bench/.work", "dbt_project/target", ".git"]:
        assert path in ignored, path


def test_locked_dependencies_are_installed_before_the_code_is_copied() -> None:
    lock_copy = index_of(lambda i: i.keyword == "COPY" and copy_sources(i) == ["requirements.lock"])
    install = index_of(lambda i: i.keyword == "RUN" and "-r requirements.lock" in i.arguments)
    first_code = index_of(lambda i: i.keyword == "COPY" and CODE & set(copy_sources(i)))
    assert lock_copy < install < first_code
    # The runtime lock, not the dev one, and the file the repo commits (what CI tested).
    assert not [i for i in INSTRUCTIONS if "requirements-dev" in i.arguments]
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "requirements.lock"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert tracked.returncode == 0, tracked.stderr


def test_the_lock_pins_every_declared_dependency_and_the_prefect_of_prefect_yaml() -> None:
    """An image built from a stale lock would lack a dependency pyproject.toml declares."""
    pinned = dict(
        line.split("==", 1)
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    )
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in declared:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
        assert name in pinned, f"{name} is declared in pyproject.toml but not in requirements.lock"
    for deploy_file in ("prefect.yaml", "prefect.docker.yaml"):
        document = yaml.safe_load((REPO / deploy_file).read_text())
        assert document["prefect-version"] == pinned["prefect"], deploy_file


def test_runs_as_a_user_that_is_not_root() -> None:
    users = of("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].arguments.split(":")[0]
    assert user not in {"root", "0"}
    # Everything after the last USER runs as that user; it must be created before.
    assert index_of(lambda i: i.keyword == "RUN" and "useradd" in i.arguments) < (
        INSTRUCTIONS.index(users[-1])
    )


def test_no_secret_is_baked_into_the_image() -> None:
    names = [n for i in of("ENV") for n in env_names(i)]
    names += [i.arguments.split("=", 1)[0] for i in of("ARG")]
    assert names, "expected the image's ENV settings"
    assert [n for n in names if SECRET_LIKE.search(n.upper())] == []
    # Credentials come from Prefect blocks and the runtime environment, never from a copied file.
    sources = {s for copy in of("COPY") for s in copy_sources(copy)}
    assert not {s for s in sources if s == "." or s.startswith(".env")}


def test_project_dir_is_where_the_image_keeps_the_project() -> None:
    [workdir] = of("WORKDIR")
    env = dict(w.split("=", 1) for i in of("ENV") for w in shlex.split(i.arguments) if "=" in w)
    assert env["POSTLOAD_PROJECT_DIR"] == workdir.arguments
    # prefect.docker.yaml's runs change into it before importing the flow.
    pull = yaml.safe_load((REPO / "prefect.docker.yaml").read_text())["pull"]
    assert pull == [
        {"prefect.deployments.steps.set_working_directory": {"directory": workdir.arguments}}
    ]


def postload_invocations() -> list[list[str]]:
    """Every `postload …` the image runs: its CMD/ENTRYPOINT and any RUN step that calls it."""
    found = [exec_form(i) for i in of("CMD") + of("ENTRYPOINT")]
    for run in of("RUN"):
        for part in re.split(r"&&|\|\||;", run.arguments):
            found.append(shlex.split(part))
    return [argv for argv in found if argv and argv[0] == "postload"]


def test_postload_commands_it_runs_exist() -> None:
    invocations = postload_invocations()
    assert invocations, "the image runs no postload command (the receiver is its default)"
    for argv in invocations:
        command, options = argv[1], [a for a in argv[2:] if a.startswith("--")]
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, f"postload {command}: {result.output}"
        for option in options:
            assert option in result.output, f"postload {command} has no {option}"


def test_the_receiver_listens_on_all_interfaces_on_the_exposed_port() -> None:
    [cmd] = of("CMD")
    argv = exec_form(cmd)
    assert argv[:2] == ["postload", "receiver"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    port = Settings.model_fields["receiver_port"].default
    assert [int(p.split("/")[0]) for e in of("EXPOSE") for p in e.arguments.split()] == [port]
    assert "--port" not in argv or argv[argv.index("--port") + 1] == str(port)


def test_the_parser_reads_continuations_and_skips_comments() -> None:
    parsed = parse("# c\nFROM x\nRUN a \\\n  # inside\n  && b\nENV A=1 \\\n    B=2\n")
    assert parsed == [
        Instruction("FROM", "x"),
        Instruction("RUN", "a && b"),
        Instruction("ENV", "A=1 B=2"),
    ]
    assert env_names(parsed[2]) == ["A", "B"]


def test_the_image_has_dbt_snowflake_from_the_lock() -> None:
    """dbt Core on Snowflake runs in the image: the lock it installs carries the adapter
    (`make image` parses the project with a Snowflake profile inside the built image)."""
    pinned = (REPO / "requirements.lock").read_text().splitlines()
    assert [line for line in pinned if line.startswith("dbt-snowflake==")], "no dbt-snowflake"
    smoke = (REPO / "tests" / "system" / "image_smoke.sh").read_text()
    assert "type: snowflake" in smoke and "dbt parse" in smoke


def ci_image_step() -> str:
    """The lines of .ci/run that build the image: its `if command -v podman` block."""
    text = (REPO / ".ci" / "run").read_text()
    match = re.search(r"^if command -v podman\b.*?^fi$", text, re.M | re.S)
    assert match, ".ci/run: no `if command -v podman … fi` block around `make image`"
    return match.group(0)


def test_ci_builds_and_smoke_tests_the_image_only_where_podman_is(tmp_path: Path) -> None:
    """The block run with a recording `make` on PATH, with and without a `podman` beside it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "make-calls"
    (bin_dir / "make").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "make").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    # /usr/bin or /bin may hold a real podman: look for the block's answer without one.
    script = ci_image_step()
    without = script.replace("command -v podman", "command -v podman-not-installed-here")

    result = subprocess.run(["bash", "-c", without], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "podman is not installed" in result.stdout
    assert not calls.exists()

    (bin_dir / "podman").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "podman").chmod(0o755)
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [call] = calls.read_text().splitlines()
    assert call.split()[0] == "image"


def test_make_image_builds_with_podman_then_runs_the_smoke_test() -> None:
    makefile = (REPO / "Makefile").read_text()
    match = re.search(r"^image:\n((?:\t.*\n)+)", makefile, re.M)
    assert match, "Makefile: no `image` target"
    recipe = match.group(1)
    assert recipe.index("podman build") < recipe.index("tests/system/image_smoke.sh $(IMAGE)")
    assert "built in" in recipe  # the build time is reported
    assert (REPO / "tests" / "system" / "image_smoke.sh").stat().st_mode & 0o111
