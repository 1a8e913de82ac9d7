"""A dbt project as postload reads it, without building anything: its manifest, the nodes a
selection picks, the models a build needs that do not exist yet; and the user's dbt setup as dbt
finds it: where ``profiles.yml`` is, the packages ``dbt deps`` installs, the profile's target."""

from __future__ import annotations

import contextvars
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from postload.config import DbtRunnerKind, Selection, Settings, WarehouseKind
from postload.dbt._invocation import DBT_TARGET_ENV, DUCKDB_PATH_ENV, profile_env

__all__ = ["DbtInvocationError", "DbtProject", "ProfileTarget"]

logger = logging.getLogger(__name__)

# dbt's own variable for the folder holding profiles.yml (its --profiles-dir option reads it).
PROFILES_DIR_ENV = "DBT_PROFILES_DIR"
DEFAULT_PACKAGES_INSTALL_PATH = "dbt_packages"
PACKAGE_LOCK_FILE = "package-lock.yml"  # what `dbt deps` writes (dbt.constants)


class DbtInvocationError(RuntimeError):
    """dbt could not run at all (project fails to parse, unknown selector, bad profile)."""


@dataclass(frozen=True)
class ProfileTarget:
    """The profile target dbt connects with for a project, rendered as dbt renders it."""

    profiles_yml: Path
    profile: str
    target: str
    type: str
    # DuckDB: the database as the profile gives it (rendered; may be relative, ':memory:', 'md:…')
    path: str | None
    # Snowflake (and other adapters with them): the database and schema dbt builds in, rendered
    database: str | None = None
    schema: str | None = None

    def describe(self) -> str:
        return f"target {self.target!r} of profile {self.profile!r} in {self.profiles_yml}"

    def duckdb_file(self) -> Path | None:
        """The file a DuckDB target opens, as DuckDB resolves it in this process (None otherwise)."""
        if self.type != "duckdb":
            return None
        # dbt-duckdb's default path is an in-memory database; a relative path is the process's.
        return Path(self.path or ":memory:").expanduser().resolve()


ProfileVariables = Callable[[], Mapping[str, str]]


class DbtProject:
    """The dbt project at ``project_dir``, its profile reading the warehouse path ``duckdb_path``.

    ``profile_vars``: the other variables its profile reads (the target, the Snowflake
    connection), asked for once, at the first dbt invocation or profile check, and set only
    while dbt runs (``profile_env``). Metadata commands (``parse``, ``ls``) run with plain dbt:
    no Prefect API is needed, except to load the Snowflake block the variables come from.
    """

    def __init__(
        self,
        project_dir: Path,
        duckdb_path: Path,
        *,
        target_path: Path | None = None,
        profile_vars: ProfileVariables | None = None,
    ):
        self.project_dir = project_dir
        self.duckdb_path = duckdb_path
        self.target_path = target_path or project_dir / "target"
        self._packages_ready = False
        self._profile_vars_source = profile_vars
        self._profile_vars: Mapping[str, str] | None = None

    # dbt Cloud mode: writes postload's parse-only profiles.yml (once) and returns its folder,
    # read instead of the user's
    parse_profile: Callable[[], Path] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DbtProject:
        if settings.dbt_runner is DbtRunnerKind.CLOUD:
            project = cls(settings.dbt_project_path, settings.duckdb_file)
            # dbt Cloud builds with its own connection; parse and ls never connect, so they need
            # no local warehouse profile or credentials (postload/dbt/_parse_profile.py)
            from postload.dbt._parse_profile import parse_profile_writer

            project.parse_profile = parse_profile_writer(
                project.project_dir, project.target_path, settings
            )
            return project
        return cls(
            settings.dbt_project_path,
            settings.duckdb_file,
            profile_vars=warehouse_profile_vars(settings),
        )

    # -- the variables profiles.yml reads ---------------------------------------------------

    def profile_vars(self) -> Mapping[str, str]:
        """The variables set for each dbt invocation besides the DuckDB path (asked for once)."""
        if self._profile_vars is None:
            source = self._profile_vars_source
            self._profile_vars = dict(source()) if source is not None else {}
        return self._profile_vars

    def secrets(self) -> list[str]:
        """The credential values among the profile variables (never part of a message)."""
        from postload.warehouse._snowflake import profile_secrets

        return profile_secrets(self._profile_vars or {})

    def redact(self, text: str) -> str:
        for secret in sorted(self.secrets(), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    @contextmanager
    def profile_env(self, duckdb_path: Path | None = None) -> Iterator[None]:
        """Every variable the profile reads, set for one dbt invocation (``profile_env``)."""
        with profile_env(duckdb_path or self.duckdb_path, self.profile_vars()):
            yield

    # -- profiles.yml -----------------------------------------------------------------------

    def _profiles_dir_candidates(self) -> tuple[Path, list[str]]:
        """The folder dbt would read profiles.yml from, and the places looked in (for messages)."""
        if self.parse_profile is not None:
            folder = self.parse_profile()
            return folder, [f"{folder} (dbt Cloud: postload's parse-only profile)"]
        if env := os.environ.get(PROFILES_DIR_ENV):  # click ignores an empty variable: so do we
            return Path(env), [f"{Path(env)} ({PROFILES_DIR_ENV})"]
        looked = [f"{self.project_dir} (the dbt project; {PROFILES_DIR_ENV} is not set)"]
        if (self.project_dir / "profiles.yml").is_file():
            return self.project_dir, looked
        home = Path.home() / ".dbt"
        return home, [*looked, f"{home} (dbt's default)"]

    def profiles_dir(self) -> Path:
        """The folder holding the profiles.yml every dbt invocation of this project reads.

        dbt's own order, with the project folder standing in for dbt's working directory (postload
        runs dbt from wherever it runs, with ``--project-dir``): ``DBT_PROFILES_DIR`` when set,
        else the project folder when it has a profiles.yml, else ``~/.dbt``. Raises
        ``DbtInvocationError`` naming the places looked in when the chosen one has none.
        """
        chosen, looked = self._profiles_dir_candidates()
        if not (chosen / "profiles.yml").is_file():
            raise DbtInvocationError(
                f"no dbt profiles.yml found for the dbt project {self.project_dir}: looked in "
                + "; ".join(looked)
                + ". Expected a profiles.yml defining the profile the project's dbt_project.yml "
                "names (`profile:`), with a target for postload's warehouse: put it in the "
                f"project folder or in ~/.dbt, or set {PROFILES_DIR_ENV} to the folder holding it"
            )
        return chosen

    def profile_target(self, duckdb_path: Path | None = None) -> ProfileTarget:
        """The profile target dbt will connect with, resolved and rendered with dbt's own code.

        The same choices a dbt invocation makes: the profile named by ``DBT_PROFILE`` or the
        project's ``profile:``, the target named by ``DBT_TARGET`` or the profile's ``target:``,
        its values rendered (``env_var()``, with ``POSTLOAD_DUCKDB_PATH`` set as for every
        invocation; Prefect block and variable placeholders resolved as prefect-dbt does). No
        adapter is loaded and nothing connects.
        """
        profiles_dir = self.profiles_dir()
        duckdb_path = duckdb_path or self.duckdb_path
        profiles_yml = profiles_dir / "profiles.yml"
        from postload.dbt._prefect_dbt_public import DbtSettings  # imports Prefect, dbt: ~1-2 s

        settings = DbtSettings(project_dir=self.project_dir, profiles_dir=profiles_dir)
        try:
            with self.profile_env(duckdb_path), settings.resolve_profiles_yml() as resolved_dir:
                # dbt keeps the environment env_var() reads in a context variable it sets per
                # invocation: set here in a copy of the context, so nothing of it stays behind.
                return contextvars.copy_context().run(
                    _render_profile_target, self.project_dir, profiles_dir, Path(resolved_dir)
                )
        except DbtInvocationError:
            raise
        except Exception as exc:  # dbt's DbtProfileError, DbtProjectError, a missing env var, …
            raise DbtInvocationError(
                f"the dbt profile in {profiles_yml} could not be read for the dbt project "
                f"{self.project_dir}: {self.redact(str(exc))}"
            ) from None  # dbt's exception may quote a rendered value: only the redacted text

    def check_profile(
        self, warehouse_is_duckdb: bool | None, duckdb_path: Path | None = None
    ) -> ProfileTarget:
        """Refuse a profile target that would not build in postload's warehouse; return it.

        A DuckDB target must open postload's warehouse file (``duckdb_path``, default this
        project's), else dbt fails later reading the raw tables ("schema raw does not exist").
        Its type must match the warehouse: DuckDB for a DuckDB warehouse, Snowflake for
        Snowflake, and a Snowflake target must build in the database of postload's Snowflake
        block (when the profile variables name it) with dbt-snowflake installed.
        ``warehouse_is_duckdb=None`` (not known) checks only a DuckDB target's file.
        """
        duckdb_path = duckdb_path or self.duckdb_path
        try:
            target = self.profile_target(duckdb_path)
        except DbtInvocationError as exc:
            # A Snowflake target whose connection postload sets only for a Snowflake warehouse
            if warehouse_is_duckdb and "'POSTLOAD_SNOWFLAKE_" in str(exc):
                raise DbtInvocationError(
                    f"postload's warehouse is DuckDB ({duckdb_path}) but the dbt profile picks "
                    f"a snowflake target, whose connection postload sets only for "
                    f"POSTLOAD_WAREHOUSE=snowflake ({exc}). Expected the duckdb target: unset "
                    f"DBT_TARGET (postload sets {DBT_TARGET_ENV}=duckdb), or set "
                    "POSTLOAD_WAREHOUSE=snowflake"
                ) from None
            raise
        if warehouse_is_duckdb is False:
            self._check_snowflake_target(target)
        if target.type != "duckdb" and warehouse_is_duckdb:
            raise DbtInvocationError(
                f"postload's warehouse is DuckDB ({duckdb_path}) but the dbt {target.describe()} "
                f"is a {target.type} target: dbt would build outside the warehouse postload "
                "loads. Expected a duckdb target whose path is "
                f"\"{{{{ env_var('{DUCKDB_PATH_ENV}') }}}}\": set the profile's `target:` (or "
                "DBT_TARGET) to one, or set POSTLOAD_WAREHOUSE to the warehouse this target uses"
            )
        profile_file = target.duckdb_file()
        if profile_file is not None and profile_file != duckdb_path.resolve():
            written = target.path or ":memory:"
            # ':memory:', 'md:…' (MotherDuck), 's3://…': not a local file postload could use
            is_file = written != ":memory:" and not re.match(r"[A-Za-z][\w+.-]+:", written)
            shown = (
                f"{written!r} ({profile_file})"
                if is_file and not Path(written).expanduser().is_absolute()
                else repr(written)
            )
            fixes = f"make the profile's path read \"{{{{ env_var('{DUCKDB_PATH_ENV}') }}}}\" "
            fixes += "(postload sets it to the warehouse for every dbt run)"
            if is_file:
                fixes += f", or set {DUCKDB_PATH_ENV}={profile_file} so postload uses that file"
            raise DbtInvocationError(
                f"the dbt {target.describe()} opens the DuckDB database {shown}, but postload's "
                f"warehouse is {duckdb_path} ({DUCKDB_PATH_ENV}, default "
                "<POSTLOAD_HOME>/warehouse.duckdb): dbt would not find the raw tables postload "
                f"loads. To fix it, {fixes}"
            )
        return target

    def _check_snowflake_target(self, target: ProfileTarget) -> None:
        from postload.warehouse._snowflake import PROFILE_DATABASE_ENV

        if target.type != "snowflake":
            found = f" (path {target.path!r})" if target.type == "duckdb" else ""
            raise DbtInvocationError(
                f"postload's warehouse is Snowflake (POSTLOAD_WAREHOUSE=snowflake) but the dbt "
                f"{target.describe()} is a {target.type} target{found}: dbt would build "
                f"outside the Snowflake database postload loads and reads. Expected a "
                f"snowflake target: set the profile's `target:` (or {DBT_TARGET_ENV} for "
                "postload's own profile, or DBT_TARGET) to one, or set POSTLOAD_WAREHOUSE="
                f"{target.type if target.type == 'duckdb' else 'duckdb'}"
            )
        loads_into = self.profile_vars().get(PROFILE_DATABASE_ENV)
        if (
            loads_into
            and target.database
            and target.database.strip('"').upper() != loads_into.strip('"').upper()
        ):
            raise DbtInvocationError(
                self.redact(
                    f"the dbt {target.describe()} builds in the Snowflake database "
                    f"{target.database!r}, but postload loads into {loads_into!r} (the database of "
                    "its Snowflake connector block): dbt would not find the raw tables postload "
                    f"loads. Expected database {loads_into!r}: make the target's database read "
                    f"\"{{{{ env_var('{PROFILE_DATABASE_ENV}') }}}}\" (postload sets it from the "
                    "block for every dbt run), or point the block at the target's database"
                )
            )
        if importlib.util.find_spec("dbt.adapters.snowflake") is None:
            raise DbtInvocationError(
                f"the dbt {target.describe()} is a snowflake target but dbt-snowflake is not "
                "installed: install it with `pip install 'postload[snowflake]'`"
            )

    # -- packages ---------------------------------------------------------------------------

    def packages_install_path(self) -> Path:
        """Where ``dbt deps`` installs this project's packages (``packages-install-path``)."""
        try:
            raw = yaml.safe_load((self.project_dir / "dbt_project.yml").read_text("utf-8"))
            value = raw.get("packages-install-path") if isinstance(raw, dict) else None
        except (OSError, ValueError, yaml.YAMLError):  # dbt reports an unreadable project itself
            value = None
        if not isinstance(value, str) or not value.strip():
            return self.project_dir / DEFAULT_PACKAGES_INSTALL_PATH
        if "{" in value:  # rendered as dbt renders dbt_project.yml (env_var, var)
            try:
                from dbt.config.renderer import DbtProjectYamlRenderer
                from dbt_common.context import set_invocation_context

                def render() -> Any:
                    set_invocation_context(os.environ)
                    return DbtProjectYamlRenderer(None, {}).render_value(value)

                value = str(contextvars.copy_context().run(render))
            except Exception:  # dbt's own error, from the invocation, says it better
                return self.project_dir / DEFAULT_PACKAGES_INSTALL_PATH
        return self.project_dir / value

    def packages_missing(self) -> str | None:
        """Why ``dbt deps`` must run before dbt can read this project, or None when it need not.

        When packages.yml or dependencies.yml lists packages and package-lock.yml is missing,
        was written for other packages (packages.yml changed since), or names a package whose
        folder is missing from the install path (a fresh checkout commits the lock file, not the
        packages). Whatever cannot be decided leaves it to dbt, which reports it.
        """
        from dbt.config.project import (
            load_yml_dict,
            package_and_project_data_from_root,
            package_config_from_data,
        )
        from dbt.config.renderer import PackageRenderer
        from dbt_common.context import set_invocation_context

        try:
            packages_data, specified_in = package_and_project_data_from_root(str(self.project_dir))
        except Exception:  # malformed: dbt's own error says which file and key
            return None
        if not isinstance(packages_data, dict) or not packages_data.get("packages"):
            return None
        lock_path = self.project_dir / PACKAGE_LOCK_FILE
        if not lock_path.is_file():
            return f"{specified_in} lists packages and there is no {PACKAGE_LOCK_FILE}"
        try:
            lock = load_yml_dict(str(lock_path))
        except Exception:
            return f"{PACKAGE_LOCK_FILE} is not readable"
        try:
            from dbt.task.deps import _create_sha1_hash  # what `dbt deps` compares the lock with

            def current_hash() -> str:
                set_invocation_context(os.environ)
                # dbt renders packages.yml, not dependencies.yml (DbtProjectYamlRenderer)
                rendered = (
                    PackageRenderer({}).render_data(packages_data)
                    if specified_in == "packages.yml"
                    else packages_data
                )
                return _create_sha1_hash(package_config_from_data(rendered, packages_data).packages)

            if lock.get("sha1_hash") != contextvars.copy_context().run(current_hash):
                return f"{specified_in} changed since {PACKAGE_LOCK_FILE} was written"
        except Exception:  # dbt's internals moved: the folders below still tell
            pass
        install = self.packages_install_path()
        entries = [p for p in lock.get("packages") or [] if isinstance(p, dict)]
        names = [n for p in entries if isinstance(n := p.get("name"), str) and n]
        if not names or len(names) < len(entries):
            # A lock without package names: an empty install folder is all that can be told.
            if not install.is_dir() or not any(install.iterdir()):
                return f"{install} is empty"
            return None
        missing = [n for n in names if not (install / n / "dbt_project.yml").is_file()]
        if missing:
            return f"{install} lacks {', '.join(missing)}"
        return None

    def ensure_packages(self) -> bool:
        """Run ``dbt deps`` once when the project's packages are not installed; whether it ran.

        Checked once per instance (a few milliseconds): before the first parse, ls or build.
        """
        if self._packages_ready:
            return False
        ran = False
        if self.packages_missing() is not None:
            # `dbt deps` empties the install folder before it fills it: two runs of a fresh
            # checkout (a burst of syncs) would pull packages from under each other's parse.
            with _deps_lock(self.packages_install_path()):
                why = self.packages_missing()  # another process may have installed them
                if why is not None:
                    logger.info("installing the dbt project's packages (dbt deps): %s", why)
                    self._invoke_plain(["deps"], self.profiles_dir())
                    ran = True
        self._packages_ready = True
        return ran

    # -- metadata commands ------------------------------------------------------------------

    def invoke_metadata(self, args: list[str]) -> Any:
        """Run a dbt command that builds nothing (parse, ls) with plain dbt: no Prefect API needed.

        Installs the project's packages first when they are missing (``ensure_packages``).
        """
        profiles_dir = self.profiles_dir()
        self.ensure_packages()
        return self._invoke_plain(args, profiles_dir, "--target-path", str(self.target_path))

    def _invoke_plain(self, args: list[str], profiles_dir: Path, *options: str) -> Any:
        with self.profile_env():
            from dbt.cli.main import dbtRunner  # dbt-core takes ~1 s to import

            res = dbtRunner().invoke(
                [
                    *args,
                    "--project-dir",
                    str(self.project_dir),
                    "--profiles-dir",
                    str(profiles_dir),
                    *options,
                    "--log-level",
                    "none",
                ]
            )
        if not res.success:
            why = self.redact(str(res.exception or res.result))
            raise DbtInvocationError(f"dbt {' '.join(args)} failed: {why}")
        return res

    def missing_parents(
        self, selection: Selection, existing_relations: Callable[[], set[tuple[str, str]]]
    ) -> list[str]:
        """Models outside the selection that selected nodes read from and that do not exist yet.

        Steady state costs one catalog query and reading manifest.json: dbt is only asked to list
        the selection when some model of the project is missing from the warehouse.
        """
        manifest = self._manifest()
        models = {
            uid: (node["schema"].lower(), (node.get("alias") or node["name"]).lower())
            for uid, node in manifest["nodes"].items()
            if node["resource_type"] in ("model", "seed", "snapshot")
            and node.get("config", {}).get("materialized") != "ephemeral"
        }
        existing = existing_relations()
        if all(rel in existing for rel in models.values()):
            return []
        selected = set(self.list_nodes(selection))
        parent_map: dict[str, list[str]] = manifest["parent_map"]
        missing: set[str] = set()
        frontier = list(selected)
        while frontier:
            uid = frontier.pop()
            for parent in parent_map.get(uid, []):
                if (
                    parent in models
                    and parent not in selected
                    and parent not in missing
                    and models[parent] not in existing
                ):
                    missing.add(parent)
                    frontier.append(parent)
        return sorted(manifest["nodes"][uid]["name"] for uid in missing)

    def model_names(self, selection: Selection) -> list[str]:
        """Names of the models, seeds and snapshots a selection picks (its tests follow them)."""
        return self._ls(selection, ("model", "seed", "snapshot"), "name")

    def _manifest(self) -> dict[str, Any]:
        path = self.target_path / "manifest.json"
        if not path.is_file():
            self.invoke_metadata(["parse"])
        return _read_manifest(path)

    def manifest(self) -> dict[str, Any]:
        """The project's manifest, parsed again when any project file (or the profiles.yml dbt
        reads, wherever it is) is newer than it."""
        path = self.target_path / "manifest.json"
        if not path.is_file() or self._newest_input() > path.stat().st_mtime:
            self.invoke_metadata(["parse"])
        return _read_manifest(path)

    def _newest_input(self) -> float:
        newest = _newest_project_file(
            self.project_dir, self.target_path, self.packages_install_path()
        )
        profiles_dir, _ = self._profiles_dir_candidates()
        try:
            return max(newest, (profiles_dir / "profiles.yml").stat().st_mtime)
        except OSError:  # none: the parse reports it
            return newest

    def list_nodes(self, selection: Selection) -> list[str]:
        """Unique ids of the nodes a build of this selection would run (no building)."""
        return self._ls(selection, ("model", "seed", "snapshot", "test"), "unique_id")

    def _ls(self, selection: Selection, resource_types: tuple[str, ...], key: str) -> list[str]:
        res = self.invoke_metadata(
            [
                "ls",
                *selection.cli_args(),
                "--resource-types",
                *resource_types,
                "--output",
                "json",
                "--output-keys",
                key,
            ]
        )
        return [json.loads(line)[key] for line in (res.result or [])]


# How long a manifest.json that is being written (another flow run's dbt parses the same
# project: dbt writes the file in place, not atomically) is waited for before it counts as broken.
MANIFEST_WRITE_WAIT_SECONDS = 30.0


@contextmanager
def _deps_lock(install_path: Path) -> Iterator[None]:
    """One ``dbt deps`` at a time per install folder on this machine.

    The lock file lives in the temp folder, not in the user's dbt project. Where ``fcntl`` is
    missing (Windows) there is no lock: the processes would race as dbt alone does.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    key = hashlib.sha1(str(install_path.resolve()).encode(), usedforsecurity=False).hexdigest()
    path = Path(tempfile.gettempdir()) / f"postload-dbt-deps-{key[:16]}.lock"
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest(path: Path) -> dict[str, Any]:
    # orjson: the missing-parents check reads manifest.json before every build (~0.7 MB for the
    # demo project): 2.0 ms, 3.3 ms with json.
    deadline = time.monotonic() + MANIFEST_WRITE_WAIT_SECONDS
    while True:
        try:
            manifest: dict[str, Any] = orjson.loads(path.read_bytes())
            return manifest
        except orjson.JSONDecodeError as exc:
            # Half written by a concurrent dbt parse: it is complete within a moment.
            if time.monotonic() > deadline:
                raise DbtInvocationError(
                    f"{path} is not valid JSON ({exc}) after {MANIFEST_WRITE_WAIT_SECONDS:g} s: "
                    "expected the manifest dbt writes; delete it and it is parsed again"
                ) from None
            time.sleep(0.1)


def _newest_project_file(project_dir: Path, target_path: Path, packages_path: Path) -> float:
    newest = 0.0
    skip = {
        target_path.resolve(),
        (project_dir / "logs").resolve(),
        (project_dir / DEFAULT_PACKAGES_INSTALL_PATH).resolve(),
        packages_path.resolve(),
    }
    for root, dirs, files in os.walk(project_dir):
        dirs[:] = [d for d in dirs if (Path(root) / d).resolve() not in skip]
        for name in files:
            newest = max(newest, (Path(root) / name).stat().st_mtime)
    return newest


def _render_profile_target(project_dir: Path, profiles_dir: Path, read_from: Path) -> ProfileTarget:
    """The target a dbt invocation of this project picks, rendered by dbt (see profile_target).

    Runs in a copy of the caller's context: it sets dbt's invocation context (its environment).
    """
    from dbt.cli.flags import args_to_context
    from dbt.config.profile import Profile, read_profile
    from dbt.config.project import load_raw_project
    from dbt.config.renderer import ProfileRenderer
    from dbt_common.context import set_invocation_context

    # dbt's own command line resolves --profile/--target from DBT_PROFILE and DBT_TARGET.
    params = args_to_context(
        ["parse", "--project-dir", str(project_dir), "--profiles-dir", str(profiles_dir)]
    ).params
    set_invocation_context(os.environ)
    renderer = ProfileRenderer(params.get("vars") or {})
    raw_name = load_raw_project(str(project_dir)).get("profile")
    name = Profile.pick_profile_name(
        params.get("profile"), renderer.render_value(raw_name) if raw_name else None
    )
    raw_profiles = read_profile(str(read_from))
    profiles_yml = profiles_dir / "profiles.yml"
    if not raw_profiles:
        raise DbtInvocationError(
            f"{profiles_yml} defines no profiles (expected the profile {name!r})"
        )
    if name not in raw_profiles:
        raise DbtInvocationError(
            f"{profiles_yml} has no profile {name!r} (the profile the dbt project {project_dir} "
            f"names); it has: {', '.join(sorted(str(p) for p in raw_profiles if p != 'config'))}"
        )
    raw_profile = raw_profiles[name]
    if not isinstance(raw_profile, dict) or not raw_profile:
        raise DbtInvocationError(f"the profile {name!r} in {profiles_yml} is empty")
    target, data = Profile.render_profile(raw_profile, name, params.get("target"), renderer)
    path, database, schema = data.get("path"), data.get("database"), data.get("schema")
    return ProfileTarget(
        profiles_yml=profiles_yml,
        profile=name,
        target=target,
        type=str(data.get("type")),
        path=None if path is None else str(path),
        database=None if database is None else str(database),
        schema=None if schema is None else str(schema),
    )


def warehouse_profile_vars(settings: Settings) -> ProfileVariables:
    """The profile variables for the settings' warehouse: its target, and for Snowflake the
    connection from the Snowflake connector block (loaded when first asked for)."""
    if settings.warehouse is not WarehouseKind.SNOWFLAKE:
        return lambda: {DBT_TARGET_ENV: "duckdb"}
    block = settings.snowflake_block

    def from_block() -> Mapping[str, str]:
        from postload.warehouse._snowflake import (
            SnowflakeBlockError,
            UnsupportedProfileCredentialsError,
            dbt_profile_env,
            load_connector_block,
        )

        try:
            connector = load_connector_block(block)
        except SnowflakeBlockError as exc:
            raise DbtInvocationError(
                f"POSTLOAD_WAREHOUSE=snowflake and dbt reads its connection from {exc}"
            ) from exc
        try:
            return {DBT_TARGET_ENV: "snowflake", **dbt_profile_env(connector)}
        except UnsupportedProfileCredentialsError as exc:
            raise DbtInvocationError(f"{exc} (block {block!r})") from None

    return from_block
