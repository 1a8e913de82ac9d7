"""The user's dbt setup as dbt finds it: profiles.yml where dbt looks, missing packages installed
with `dbt deps`, and a profile that would not build in postload's warehouse refused up front.

Real dbt throughout (plain dbt for parse, CoreDbtRunner.build outside a flow: no Prefect server).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from postload.config import Selection
from postload.dbt import DbtInvocationError, DbtProject
from postload.dbt._core import CoreDbtRunner
from postload.dbt.project import _deps_lock
from tests.conftest import PostloadHome, suite_secret

ENV_PROFILE = """\
tiny:
  target: dev
  outputs:
    dev:
      type: duckdb
      path: "{{ env_var('POSTLOAD_DUCKDB_PATH') }}"
"""

TINY_PACKAGE = {
    "dbt_project.yml": 'name: tiny_pkg\nversion: "1.0.0"\nconfig-version: 2\n',
    "macros/answer.sql": "{% macro tiny_answer() %}42{% endmacro %}\n",
}
OTHER_PACKAGE = {
    "dbt_project.yml": 'name: other_pkg\nversion: "1.0.0"\nconfig-version: 2\n',
    "macros/other.sql": "{% macro other_answer() %}7{% endmacro %}\n",
}


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def tiny_project(
    root: Path,
    *,
    profile: str | None = ENV_PROFILE,
    model: str = "select 1 as answer",
    project_extra: str = "",
) -> Path:
    """A dbt project with one model, and profiles.yml in its folder unless ``profile`` is None."""
    files = {
        "dbt_project.yml": (
            'name: tiny\nversion: "1.0.0"\nprofile: tiny\n'
            "flags:\n  send_anonymous_usage_stats: false\n" + project_extra
        ),
        "models/answer.sql": model,
    }
    if profile is not None:
        files["profiles.yml"] = profile
    return write(root, files)


@pytest.fixture(autouse=True)
def dbt_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No DBT_* variable from the caller's shell; a home of its own (its ~/.dbt)."""
    for name in ("DBT_PROFILES_DIR", "DBT_TARGET", "DBT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def no_prefect_api() -> Iterator[None]:
    """A build outside a flow run needs no Prefect API: none is reachable here (as in
    `make test-fast`), and none is started (prefect-dbt builds a client it never opens)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        yield


def warehouse_rows(path: Path, query: str) -> list[tuple]:
    con = duckdb.connect(str(path))
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


# -- profiles.yml -------------------------------------------------------------------------------


def test_profiles_yml_is_looked_for_in_dbts_order(
    tmp_path: Path, dbt_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = DbtProject(tiny_project(tmp_path / "project"), tmp_path / "wh.duckdb")
    elsewhere = write(tmp_path / "elsewhere", {"profiles.yml": ENV_PROFILE})
    user_dbt = dbt_env / ".dbt"

    assert project.profiles_dir() == project.project_dir
    monkeypatch.setenv("DBT_PROFILES_DIR", str(elsewhere))
    assert project.profiles_dir() == elsewhere  # the variable wins over the project's own
    monkeypatch.setenv("DBT_PROFILES_DIR", "")  # empty: unset, as for dbt's command line
    assert project.profiles_dir() == project.project_dir
    (project.project_dir / "profiles.yml").unlink()
    write(user_dbt, {"profiles.yml": ENV_PROFILE})
    assert project.profiles_dir() == user_dbt


def test_no_profiles_yml_names_the_places_looked_in(
    tmp_path: Path, dbt_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project_dir = tiny_project(tmp_path / "project", profile=None)
    project = DbtProject(project_dir, tmp_path / "wh.duckdb")
    with pytest.raises(DbtInvocationError) as nowhere:
        project.invoke_metadata(["parse"])
    message = str(nowhere.value)
    assert str(project_dir) in message and str(dbt_env / ".dbt") in message
    assert "DBT_PROFILES_DIR" in message and "profile:" in message
    assert not (project_dir / "target").exists()  # refused before dbt ran

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DBT_PROFILES_DIR", str(empty))
    runner = CoreDbtRunner(project_dir, tmp_path / "wh.duckdb", warehouse_is_duckdb=True)
    with pytest.raises(DbtInvocationError, match=f"looked in {empty} \\(DBT_PROFILES_DIR\\)"):
        runner.build(Selection(select="answer"), cause="test")


def test_dbt_uses_the_profile_from_DBT_PROFILES_DIR_to_parse_and_to_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The project's own profiles.yml points elsewhere: both paths read the variable's instead."""
    stray = tmp_path / "stray.duckdb"
    project_dir = tiny_project(
        tmp_path / "project",
        profile=f"tiny:\n  target: dev\n  outputs:\n    dev:\n      type: duckdb\n"
        f"      path: {stray}\n",
    )
    monkeypatch.setenv(
        "DBT_PROFILES_DIR", str(write(tmp_path / "ci", {"profiles.yml": ENV_PROFILE}))
    )
    warehouse = tmp_path / "wh.duckdb"

    manifest = DbtProject(project_dir, warehouse).manifest()
    assert "model.tiny.answer" in manifest["nodes"]
    build = CoreDbtRunner(project_dir, warehouse, warehouse_is_duckdb=True).build(
        Selection(select="answer"), cause="test"
    )
    assert build.status == "success", build
    assert warehouse_rows(warehouse, "select answer from main.answer") == [(1,)]
    assert not stray.exists()


def test_a_changed_profiles_yml_outside_the_project_is_parsed_again(
    tmp_path: Path, dbt_env: Path
) -> None:
    project_dir = tiny_project(tmp_path / "project", profile=None)
    profiles = write(dbt_env / ".dbt", {"profiles.yml": ENV_PROFILE}) / "profiles.yml"
    project = DbtProject(project_dir, tmp_path / "wh.duckdb")
    project.manifest()
    manifest = project.target_path / "manifest.json"
    parsed_at = manifest.stat().st_mtime
    project.manifest()
    assert manifest.stat().st_mtime == parsed_at
    later = time.time() + 5
    os.utime(profiles, (later, later))
    project.manifest()
    assert manifest.stat().st_mtime > parsed_at


# -- packages -----------------------------------------------------------------------------------


def project_with_package(tmp_path: Path, project_extra: str = "") -> Path:
    write(tmp_path / "tiny_pkg", TINY_PACKAGE)
    project_dir = tiny_project(
        tmp_path / "project",
        model="select {{ tiny_pkg.tiny_answer() }} as answer",
        project_extra=project_extra,
    )
    return write(project_dir, {"packages.yml": "packages:\n  - local: ../tiny_pkg\n"})


def test_missing_packages_are_installed_before_parse_and_before_a_build(tmp_path: Path) -> None:
    project_dir = project_with_package(tmp_path)
    warehouse = tmp_path / "wh.duckdb"

    manifest = DbtProject(project_dir, warehouse).manifest()
    assert "macro.tiny_pkg.tiny_answer" in manifest["macros"]
    assert (project_dir / "dbt_packages" / "tiny_pkg" / "dbt_project.yml").is_file()
    assert (project_dir / "package-lock.yml").is_file()

    # A fresh checkout: the lock file is committed, the packages are not. The build path
    # (no missing-parents check, so no metadata command) installs them itself.
    shutil.rmtree(project_dir / "dbt_packages")
    runner = CoreDbtRunner(project_dir, warehouse, warehouse_is_duckdb=True)
    build = runner.build(Selection(select="answer"), cause="test")
    assert build.status == "success", build
    assert warehouse_rows(warehouse, "select answer from main.answer") == [(42,)]
    assert (project_dir / "dbt_packages" / "tiny_pkg").exists()


def test_packages_another_process_is_installing_are_waited_for_not_installed_again(
    tmp_path: Path,
) -> None:
    """`dbt deps` empties the install folder first: two installs at once would pull packages
    from under each other. A file left in the folder shows whether the second one ran."""
    project_dir = project_with_package(tmp_path)
    warehouse = tmp_path / "wh.duckdb"
    installing, waiting = DbtProject(project_dir, warehouse), DbtProject(project_dir, warehouse)
    outcome: dict[str, bool] = {}
    thread = threading.Thread(target=lambda: outcome.update(ran=waiting.ensure_packages()))
    with _deps_lock(installing.packages_install_path()):  # as another process's ensure_packages
        thread.start()
        installing._invoke_plain(["deps"], installing.profiles_dir())
        (project_dir / "dbt_packages" / "left-here").touch()
    thread.join(timeout=120)
    assert outcome == {"ran": False}
    assert (project_dir / "dbt_packages" / "left-here").exists()


def test_installed_packages_are_left_alone_until_packages_yml_changes(tmp_path: Path) -> None:
    """`dbt deps` empties the install folder first: a file left there shows whether it ran."""
    project_dir = project_with_package(tmp_path, "packages-install-path: vendor\n")
    warehouse = tmp_path / "wh.duckdb"
    DbtProject(project_dir, warehouse).invoke_metadata(["parse"])
    installed = project_dir / "vendor"
    assert (installed / "tiny_pkg").exists() and not (project_dir / "dbt_packages").exists()

    (installed / "left-here").touch()
    DbtProject(project_dir, warehouse).invoke_metadata(["parse"])
    assert (installed / "left-here").exists()

    write(tmp_path / "other_pkg", OTHER_PACKAGE)
    write(
        project_dir,
        {"packages.yml": "packages:\n  - local: ../tiny_pkg\n  - local: ../other_pkg\n"},
    )
    manifest = DbtProject(project_dir, warehouse).manifest()
    assert not (installed / "left-here").exists()
    assert "macro.other_pkg.other_answer" in manifest["macros"]


def test_a_project_without_packages_never_runs_deps(tmp_path: Path) -> None:
    project_dir = tiny_project(tmp_path / "project")
    project = DbtProject(project_dir, tmp_path / "wh.duckdb")
    assert project.packages_missing() is None
    project.invoke_metadata(["parse"])
    assert (project.target_path / "manifest.json").is_file()
    assert not (project_dir / "dbt_packages").exists()
    assert not (project_dir / "package-lock.yml").exists()


# -- the profile's target -----------------------------------------------------------------------


def duckdb_profile(**targets: str) -> str:
    outputs = "".join(
        f"    {name}:\n      type: duckdb\n      path: {path}\n" for name, path in targets.items()
    )
    return f"tiny:\n  target: {next(iter(targets))}\n  outputs:\n{outputs}"


def test_a_profile_on_another_duckdb_file_is_refused_before_dbt_runs(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.duckdb"
    project_dir = tiny_project(tmp_path / "project", profile=duckdb_profile(dev=str(theirs)))
    warehouse = tmp_path / "wh.duckdb"

    with pytest.raises(DbtInvocationError) as refused:
        DbtProject(project_dir, warehouse).check_profile(True, warehouse)
    message = str(refused.value)
    assert str(theirs) in message and str(warehouse) in message
    assert "env_var('POSTLOAD_DUCKDB_PATH')" in message
    assert f"POSTLOAD_DUCKDB_PATH={theirs}" in message

    runner = CoreDbtRunner(project_dir, warehouse, warehouse_is_duckdb=True)
    with pytest.raises(DbtInvocationError, match="would not find the raw tables"):
        runner.build(Selection(select="answer"), cause="test")
    assert not theirs.exists() and not warehouse.exists()
    assert not (project_dir / "target").exists()

    write(project_dir, {"profiles.yml": duckdb_profile(dev='":memory:"')})
    with pytest.raises(DbtInvocationError) as in_memory:
        DbtProject(project_dir, warehouse).check_profile(True)
    assert "database ':memory:'" in str(in_memory.value)
    assert "POSTLOAD_DUCKDB_PATH=" not in str(in_memory.value)  # no file to point postload at


def test_the_target_is_the_one_dbt_would_pick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DBT_TARGET, env_var() and a path relative to the working directory, as dbt resolves them."""
    warehouse = tmp_path / "wh.duckdb"
    project_dir = tiny_project(
        tmp_path / "project",
        profile=duckdb_profile(
            dev=str(tmp_path / "theirs.duckdb"),
            postload="\"{{ env_var('POSTLOAD_DUCKDB_PATH') }}\"",
            relative="wh.duckdb",
        ),
    )
    project = DbtProject(project_dir, warehouse)
    with pytest.raises(DbtInvocationError, match="target 'dev' of profile 'tiny'"):
        project.check_profile(True)

    monkeypatch.setenv("DBT_TARGET", "postload")
    target = project.check_profile(True)
    assert (target.target, target.type, target.path) == ("postload", "duckdb", str(warehouse))

    monkeypatch.setenv("DBT_TARGET", "relative")
    monkeypatch.chdir(tmp_path)
    assert project.check_profile(True).duckdb_file() == warehouse.resolve()

    monkeypatch.setenv("DBT_TARGET", "nope")
    with pytest.raises(DbtInvocationError, match="does not have a target named 'nope'"):
        project.check_profile(True)


def test_the_profiles_warehouse_kind_must_be_postloads(tmp_path: Path) -> None:
    snowflake = (
        "tiny:\n  target: prod\n  outputs:\n    prod:\n      type: snowflake\n"
        "      account: acme\n      user: dbt\n      database: analytics\n      schema: marts\n"
    )
    warehouse = tmp_path / "wh.duckdb"
    on_snowflake = DbtProject(tiny_project(tmp_path / "snowflake", profile=snowflake), warehouse)
    with pytest.raises(DbtInvocationError) as refused:
        on_snowflake.check_profile(True, warehouse)
    assert "is a snowflake target" in str(refused.value) and str(warehouse) in str(refused.value)
    # dbt-snowflake need not be installed to tell: nothing is loaded or connected.
    assert on_snowflake.check_profile(False).type == "snowflake"

    on_duckdb = DbtProject(tiny_project(tmp_path / "duckdb"), warehouse)
    with pytest.raises(DbtInvocationError, match=r"warehouse is Snowflake .* duckdb target"):
        on_duckdb.check_profile(False)
    assert on_duckdb.check_profile(None).path == str(warehouse)


def test_a_profile_dbt_cannot_render_is_refused_with_dbts_reason(tmp_path: Path) -> None:
    project_dir = tiny_project(
        tmp_path / "project", profile=duckdb_profile(dev="\"{{ env_var('NO_SUCH_VARIABLE') }}\"")
    )
    with pytest.raises(DbtInvocationError, match=r"(?s)could not be read.*NO_SUCH_VARIABLE"):
        DbtProject(project_dir, tmp_path / "wh.duckdb").check_profile(True)
    write(project_dir, {"profiles.yml": ENV_PROFILE.replace("tiny:", "other:")})
    with pytest.raises(DbtInvocationError, match=r"has no profile 'tiny'.*it has: other"):
        DbtProject(project_dir, tmp_path / "wh.duckdb").check_profile(True)


def test_the_checked_in_profile_follows_postloads_warehouse(postload_home: PostloadHome) -> None:
    project = DbtProject(postload_home.root / "dbt_project", postload_home.duckdb)
    target = project.check_profile(True, postload_home.duckdb)
    assert target.duckdb_file() == postload_home.duckdb.resolve()
    assert target.profiles_yml == postload_home.root / "dbt_project" / "profiles.yml"


def test_a_runner_checks_its_profile_once(tmp_path: Path) -> None:
    project_dir = tiny_project(tmp_path / "project")
    runner = CoreDbtRunner(project_dir, tmp_path / "wh.duckdb", warehouse_is_duckdb=True)
    runner.check_profile()
    write(project_dir, {"profiles.yml": duckdb_profile(dev=str(tmp_path / "theirs.duckdb"))})
    runner.check_profile()  # cached: a build checks it at its start, every time
    with pytest.raises(DbtInvocationError):
        CoreDbtRunner(project_dir, tmp_path / "wh.duckdb", warehouse_is_duckdb=True).check_profile()


# -- the Snowflake target -----------------------------------------------------------------------

SNOWFLAKE_PASSWORD = suite_secret("dbt profile: Snowflake password", "sf-profile-pw-5b71")


def snowflake_vars(database: str = "DB") -> dict[str, str]:
    """What postload sets for a Snowflake warehouse, from a connector block built in memory."""
    from prefect_snowflake import SnowflakeConnector, SnowflakeCredentials

    from postload.warehouse._snowflake import dbt_profile_env

    block = SnowflakeConnector(
        credentials=SnowflakeCredentials(account="acct", user="u", password=SNOWFLAKE_PASSWORD),
        database=database,
        warehouse="WH",
        schema="ANALYTICS",
    )
    return {"POSTLOAD_DBT_TARGET": "snowflake", **dbt_profile_env(block)}


def test_the_checked_in_profile_builds_in_the_snowflake_blocks_database(
    postload_home: PostloadHome,
) -> None:
    project_dir = postload_home.root / "dbt_project"
    project = DbtProject(project_dir, postload_home.duckdb, profile_vars=snowflake_vars)
    before = dict(os.environ)
    target = project.check_profile(False)
    assert (target.target, target.type, target.database) == ("snowflake", "snowflake", "DB")
    assert dict(os.environ) == before  # set for the rendering only

    with pytest.raises(DbtInvocationError) as duckdb_warehouse:
        project.check_profile(True)
    assert "warehouse is DuckDB" in str(duckdb_warehouse.value)
    assert "is a snowflake target" in str(duckdb_warehouse.value)

    on_duckdb = DbtProject(
        project_dir, postload_home.duckdb, profile_vars=lambda: {"POSTLOAD_DBT_TARGET": "duckdb"}
    )
    with pytest.raises(DbtInvocationError) as snowflake_warehouse:
        on_duckdb.check_profile(False)
    message = str(snowflake_warehouse.value)
    assert "warehouse is Snowflake" in message and "target 'duckdb'" in message
    assert "is a duckdb target" in message and "POSTLOAD_DBT_TARGET" in message


def test_a_snowflake_target_on_another_database_is_refused_naming_both(tmp_path: Path) -> None:
    """A user's own profile (no postload variables): its target is still checked."""
    profile = (
        "tiny:\n  target: prod\n  outputs:\n    prod:\n      type: snowflake\n"
        "      account: acme\n      user: dbt\n      database: analytics_dev\n      schema: marts\n"
    )
    project_dir = tiny_project(tmp_path / "project", profile=profile)
    project = DbtProject(project_dir, tmp_path / "wh.duckdb", profile_vars=snowflake_vars)
    with pytest.raises(DbtInvocationError) as refused:
        project.check_profile(False)
    message = str(refused.value)
    assert "'analytics_dev'" in message and "postload loads into 'DB'" in message
    assert "env_var('POSTLOAD_SNOWFLAKE_DATABASE')" in message

    same = DbtProject(
        project_dir, tmp_path / "wh.duckdb", profile_vars=lambda: snowflake_vars("ANALYTICS_DEV")
    )
    assert same.check_profile(False).database == "analytics_dev"  # Snowflake's names: any case


def test_a_profile_error_never_shows_the_blocks_password(tmp_path: Path) -> None:
    """A profile quoting the password where a database or a port goes: refused, not shown."""
    secret = "\"{{ env_var('DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_PASSWORD') }}\""
    profile = (
        "tiny:\n  target: prod\n  outputs:\n    prod:\n      type: snowflake\n"
        f"      account: acme\n      database: {secret}\n      schema: marts\n"
    )
    project_dir = tiny_project(tmp_path / "project", profile=profile)
    runner = CoreDbtRunner(
        project_dir, tmp_path / "wh.duckdb", warehouse_is_duckdb=False, profile_vars=snowflake_vars
    )
    with pytest.raises(DbtInvocationError, match="builds in the Snowflake database") as refused:
        runner.check_profile()
    assert SNOWFLAKE_PASSWORD not in str(refused.value) and "'***'" in str(refused.value)

    write(
        project_dir,
        {"profiles.yml": profile.replace("database: DB", "") + f"      port: {secret}\n"},
    )
    with pytest.raises(DbtInvocationError) as failed:
        runner.project.invoke_metadata(["parse"])
    # the port's value, refused by dbt: never quoted
    assert SNOWFLAKE_PASSWORD not in str(failed.value)
    assert "is not valid under any of the given schemas" in str(failed.value)


def test_opening_the_core_runner_refuses_a_profile_for_the_other_warehouse(
    postload_home: PostloadHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What every flow does first: a mismatch fails there, before anything is loaded."""
    from prefect_snowflake import SnowflakeConnector

    from postload.config import Settings
    from postload.dbt import open_dbt_runner

    blocks = {"sf"}
    loaded: list[str] = []

    def load(cls: type, name: str, **kwargs: object) -> SnowflakeConnector:
        from prefect_snowflake import SnowflakeCredentials

        loaded.append(name)
        if name not in blocks:
            raise ValueError(f"Unable to find block document named {name}")
        return SnowflakeConnector(
            credentials=SnowflakeCredentials(account="acct", user="u", password=SNOWFLAKE_PASSWORD),
            database="DB",
            warehouse="WH",
            schema="ANALYTICS",
        )

    monkeypatch.setattr(SnowflakeConnector, "load", classmethod(load))
    before = dict(os.environ)

    monkeypatch.setenv("DBT_TARGET", "snowflake")  # the user's choice, on a DuckDB warehouse
    with pytest.raises(
        DbtInvocationError, match=r"warehouse is DuckDB .* picks a snowflake target"
    ):
        open_dbt_runner(Settings())

    monkeypatch.setenv("POSTLOAD_WAREHOUSE", "snowflake")
    monkeypatch.setenv("POSTLOAD_SNOWFLAKE_BLOCK", "sf")
    monkeypatch.setenv("DBT_TARGET", "duckdb")
    with pytest.raises(DbtInvocationError) as duckdb_target:
        open_dbt_runner(Settings())
    assert "warehouse is Snowflake" in str(duckdb_target.value)
    assert "target 'duckdb'" in str(duckdb_target.value)

    monkeypatch.delenv("DBT_TARGET")  # the target follows the warehouse
    runner = open_dbt_runner(Settings())
    assert runner.kind == "core" and loaded == ["sf", "sf"]  # once per runner

    monkeypatch.setenv("POSTLOAD_SNOWFLAKE_BLOCK", "nope")
    with pytest.raises(DbtInvocationError, match=r"block 'nope' \(POSTLOAD_SNOWFLAKE_BLOCK\)"):
        open_dbt_runner(Settings())
    # no profile variable stayed behind
    assert {k: v for k, v in os.environ.items() if k not in before} == {
        "POSTLOAD_WAREHOUSE": "snowflake",
        "POSTLOAD_SNOWFLAKE_BLOCK": "nope",
    }


def test_a_manifest_being_written_by_another_parse_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from postload.dbt import project as project_module

    path = tmp_path / "manifest.json"
    whole = json.dumps({"nodes": {"model.p.m": {}}, "sources": {}})
    path.write_text(whole[: len(whole) // 2])  # what a concurrent dbt parse leaves mid-write
    writer = threading.Timer(0.3, path.write_text, args=(whole,))
    writer.start()
    try:
        assert project_module._read_manifest(path) == json.loads(whole)
    finally:
        writer.join()

    path.write_text(whole[:10])  # never completed: a clear error, not a JSON traceback
    monkeypatch.setattr(project_module, "MANIFEST_WRITE_WAIT_SECONDS", 0.3)
    with pytest.raises(DbtInvocationError, match="not valid JSON"):
        project_module._read_manifest(path)
