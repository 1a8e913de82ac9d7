"""``postload doctor``: check a postload setup end to end, in the order things depend on each other.

Each check is a plain function returning ``CheckResult`` objects (✓ ok, ! warning, ✗ failure,
- skipped because an earlier check failed), each failure or warning with what to do about it:

a. the pipeline config loads;
b. it matches the dbt project: every source's dbt source exists (with its tables'
   ``loaded_at_field``), every source's selection selects something;
c. the dbt profile and target are readable, open postload's warehouse, and dbt can connect; on
   Snowflake with dbt Core, first: dbt-snowflake is installed and the Snowflake connector block
   dbt's connection comes from loads, then the target builds in that block's database;
d. ``POSTLOAD_WAREHOUSE`` matches the profile target's adapter type;
e. the Prefect API answers (no ``PREFECT_API_URL``: a warning, the rest is skipped);
f. the blocks these settings need exist (Snowflake, dbt Cloud, the Fivetran webhook secret);
g. the deployments of ``prefect.yaml`` exist on that API;
h. the failure automations are applied (where a notification block exists).

Secret values are never part of a result: messages name variables and blocks, and ``scrub``
removes any known secret value from the text as a last line of defence.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postload.config import (
    FIVETRAN_WEBHOOK_SECRET_ENV,
    ConfigError,
    DbtRunnerKind,
    FivetranLoader,
    PipelineConfig,
    Settings,
    WarehouseKind,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

    from postload.dbt import DbtProject
    from postload.dbt.project import ProfileTarget

__all__ = [
    "CheckResult",
    "Status",
    "check_automations",
    "check_blocks",
    "check_config",
    "check_dbt_connection",
    "check_dbt_on_snowflake",
    "check_dbt_profile",
    "check_dbt_project",
    "check_deployments",
    "check_prefect_api",
    "check_sources",
    "check_warehouse_matches_profile",
    "known_secrets",
    "run_checks",
    "scrub",
]


class Status(StrEnum):
    OK = "ok"
    WARN = "warning"
    FAIL = "failure"
    SKIP = "skipped"

    @property
    def symbol(self) -> str:
        return {"ok": "✓", "warning": "!", "failure": "✗", "skipped": "-"}[self.value]


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: ``message`` says what was found, ``fix`` what to do about it."""

    check: str
    status: Status
    message: str
    fix: str | None = None
    details: tuple[str, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL

    def lines(self) -> list[str]:
        out = [f"{self.status.symbol} {self.check}: {self.message}"]
        out += [f"    {d}" for d in self.details]
        if self.fix:
            out.append(f"    fix: {self.fix}")
        return out


def _ok(check: str, message: str, **kw: Any) -> CheckResult:
    return CheckResult(check, Status.OK, message, **kw)


def _warn(check: str, message: str, fix: str | None = None, **kw: Any) -> CheckResult:
    return CheckResult(check, Status.WARN, message, fix, **kw)


def _fail(check: str, message: str, fix: str | None = None, **kw: Any) -> CheckResult:
    return CheckResult(check, Status.FAIL, message, fix, **kw)


def _skip(check: str, why: str) -> CheckResult:
    return CheckResult(check, Status.SKIP, f"not checked: {why}")


# --- secrets -----------------------------------------------------------------------------------


def known_secrets(settings: Settings | None = None) -> list[str]:
    """Every secret value this process knows of (environment and settings), longest first."""
    from postload.blocks import BlockEnv

    values = list(BlockEnv().secret_values())
    for name in ("FIVETRAN_API_KEY", "FIVETRAN_API_SECRET", "PREFECT_API_KEY", "DBT_ENV_SECRET"):
        if value := os.environ.get(name, "").strip():
            values.append(value)
    values += [v for k, v in os.environ.items() if k.startswith("DBT_ENV_SECRET_") and v.strip()]
    if settings is not None and settings.fivetran_webhook_secret is not None:
        values.append(settings.fivetran_webhook_secret.get_secret_value())
    try:
        from prefect.settings import get_current_settings

        api = get_current_settings().api
        for secret in (api.key, api.auth_string):
            if secret is not None:
                values.append(secret.get_secret_value())
    except Exception:  # Prefect's settings could not be read: nothing of them to hide
        pass
    # Very short values would blank out ordinary words; nothing real is that short.
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _scrub_result(result: CheckResult, secrets: Sequence[str]) -> CheckResult:
    if not secrets:
        return result
    return CheckResult(
        result.check,
        result.status,
        scrub(result.message, secrets),
        scrub(result.fix, secrets) if result.fix else None,
        tuple(scrub(d, secrets) for d in result.details),
    )


def _redact_url(url: str) -> str:
    """A URL without user info (``user:password@``) or query string."""
    return re.sub(r"(?<=://)[^/@]*@", "", url).split("?", 1)[0]


# --- a. the pipeline config --------------------------------------------------------------------


def check_config(settings: Settings) -> tuple[CheckResult, PipelineConfig | None]:
    """(a) The pipeline config loads; the config itself for the checks that need it."""
    name = "pipeline config"
    try:
        pipeline = settings.load_pipeline()
    except ConfigError as exc:
        return (
            _fail(
                name,
                str(exc),
                "fix the key named above (docs/configuration.md), or write a first one from "
                "your dbt project with `postload init --dbt-project PATH`",
            ),
            None,
        )
    kinds: dict[str, int] = {}
    for s in pipeline.sources:
        kinds[s.loader.type] = kinds.get(s.loader.type, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return (
        _ok(
            name,
            f"{settings.pipeline_config_path} loads: {len(pipeline.sources)} source(s) ({summary})"
            + (", full_run on" if pipeline.full_run is not None else ""),
        ),
        pipeline,
    )


# --- b. the config against the dbt project -----------------------------------------------------


def check_dbt_project(project: DbtProject) -> tuple[CheckResult, dict[str, Any] | None]:
    """The dbt project parses; its manifest for the source checks."""
    from postload.dbt import DbtInvocationError

    name = "dbt project"
    if not (project.project_dir / "dbt_project.yml").is_file():
        return (
            _fail(
                name,
                f"{project.project_dir} is not a dbt project (no dbt_project.yml)",
                "set POSTLOAD_DBT_PROJECT_DIR to the folder with your dbt_project.yml "
                "(relative to POSTLOAD_PROJECT_DIR, or absolute)",
            ),
            None,
        )
    try:
        manifest = project.manifest()
    except DbtInvocationError as exc:
        return (
            _fail(
                name,
                f"{project.project_dir} does not parse: {exc}",
                "run `dbt parse` in the project to see dbt's own report",
            ),
            None,
        )
    n_sources = len({n["source_name"] for n in manifest.get("sources", {}).values()})
    n_models = sum(1 for n in manifest.get("nodes", {}).values() if n["resource_type"] == "model")
    return _ok(
        name, f"{project.project_dir} parses: {n_sources} dbt source(s), {n_models} model(s)"
    ), manifest


def check_sources(
    pipeline: PipelineConfig,
    project: DbtProject,
    manifest: dict[str, Any],
    config_path: Path | str = "postload.yaml",
) -> list[CheckResult]:
    """(b) One result per source: its dbt source exists in the manifest (for a source without
    raw_table: with a ``loaded_at_field`` for each table), and its selection selects nodes."""
    from postload.dbt import DbtInvocationError
    from postload.sources import source_tables

    declared = {n["source_name"] for n in manifest.get("sources", {}).values()}
    results = []
    for source in pipeline.sources:
        name = f"source {source.name}"
        problems: list[str] = []
        fixes: list[str] = []
        warnings: list[str] = []
        found: list[str] = []
        one = pipeline.model_copy(update={"sources": [source]})
        try:
            tables = source_tables(one, manifest, config_path)[source.name]
        except ConfigError as exc:
            problems.append(str(exc))
            fixes.append(
                f"declare dbt source {source.dbt_source_name!r} in the dbt project, or point "
                "`dbt_source:` at the one its loader writes"
            )
            tables = None
        if tables is not None and source.tables_from_dbt:
            fields = sorted({t.loaded_at_field for t in tables})
            found.append(
                f"dbt source {source.dbt_source_name}: {len(tables)} table(s), "
                f"loaded_at_field {', '.join(fields)}"
            )
        elif tables is not None:
            found.append(f"{pipeline.raw_schema}.{source.raw_table}")
            if source.dbt_source_name not in declared:
                warnings.append(
                    f"the dbt project declares no source {source.dbt_source_name!r}, so no model "
                    f"can read {pipeline.raw_schema}.{source.raw_table} through source()"
                )
        # A missing dbt source makes its default selection empty: said once, above.
        if tables is not None or source.selection is not None:
            selection = source.effective_selection
            try:
                nodes = project.list_nodes(selection)
            except DbtInvocationError as exc:
                problems.append(f"dbt build {selection.describe()}: {exc}")
                fixes.append(f"fix `selection:` of source {source.name!r} in postload.yaml")
            else:
                if nodes:
                    found.append(f"dbt build {selection.describe()} selects {len(nodes)} node(s)")
                else:
                    problems.append(f"dbt build {selection.describe()} selects nothing")
                    fixes.append(
                        f"change `selection:` of source {source.name!r} to select the models "
                        f"built from it (check with `postload plan {source.name}`), or add models "
                        "that read the dbt source"
                    )
        if problems:
            results.append(_fail(name, "; ".join(problems), "; ".join(fixes), details=tuple(found)))
        elif warnings:
            results.append(
                _warn(
                    name,
                    "; ".join([*found, *warnings]),
                    f"declare a dbt source {source.dbt_source_name!r} reading "
                    f"{pipeline.raw_schema}.{source.raw_table} (with loaded_at_field _loaded_at)",
                )
            )
        else:
            results.append(_ok(name, "; ".join(found)))
    return results


# --- c/d. the dbt profile, the warehouse and the connection ------------------------------------


def _dbt_on_snowflake(settings: Settings) -> bool:
    return (
        settings.warehouse is WarehouseKind.SNOWFLAKE and settings.dbt_runner is DbtRunnerKind.CORE
    )


def check_dbt_on_snowflake(
    settings: Settings, project: DbtProject, api_available: bool
) -> tuple[list[CheckResult], bool]:
    """(c) ``POSTLOAD_WAREHOUSE=snowflake`` with dbt Core: dbt-snowflake is installed, and the
    Snowflake connector block the profile's connection comes from loads (it needs the Prefect
    API). Whether dbt can read the project and profile at all (the checks after need it)."""
    from postload.dbt import DbtInvocationError

    results = []
    adapter = importlib.util.find_spec("dbt.adapters.snowflake") is not None
    if adapter:
        version = importlib.metadata.version("dbt-snowflake")
        results.append(_ok("dbt-snowflake", f"dbt-snowflake {version} is installed"))
    else:
        results.append(
            _fail(
                "dbt-snowflake",
                "POSTLOAD_WAREHOUSE=snowflake with dbt Core (POSTLOAD_DBT_RUNNER=core) needs the "
                "dbt-snowflake adapter, which is not installed",
                "pip install 'postload[snowflake]'",
            )
        )
    name = "dbt's Snowflake connection"
    block = settings.snowflake_block
    if not api_available:
        results.append(
            _skip(name, f"it comes from the Snowflake connector block {block!r}: no Prefect API")
        )
        return results, False
    try:
        variables = project.profile_vars()
    except DbtInvocationError as exc:
        results.append(
            _fail(
                name,
                str(exc),
                "set SNOWFLAKE_ACCOUNT, SNOWFLAKE_USER, SNOWFLAKE_PASSWORD (or "
                "SNOWFLAKE_PRIVATE_KEY_PATH), SNOWFLAKE_ROLE, SNOWFLAKE_WAREHOUSE and "
                "SNOWFLAKE_DATABASE, then run `postload blocks register`",
            )
        )
        return results, False
    from postload.warehouse._snowflake import (
        PROFILE_ACCOUNT_ENV,
        PROFILE_DATABASE_ENV,
        PROFILE_SCHEMA_ENV,
    )

    results.append(
        _ok(
            name,
            f"from the block {block!r}: account {variables.get(PROFILE_ACCOUNT_ENV)}, database "
            f"{variables.get(PROFILE_DATABASE_ENV)}, schema {variables.get(PROFILE_SCHEMA_ENV)}",
        )
    )
    return results, adapter


def check_dbt_profile(
    settings: Settings, project: DbtProject
) -> tuple[CheckResult, ProfileTarget | None]:
    """(c) The profile target dbt connects with is readable; with a DuckDB warehouse and target,
    it opens postload's warehouse file (``DbtProject.check_profile``, where this version has it)."""
    from postload.dbt import DbtInvocationError

    name = "dbt profile"
    profile_target = getattr(project, "profile_target", None)
    if profile_target is None:
        return _skip(name, "this postload cannot read dbt profiles (no profile_target)"), None
    try:
        target = profile_target()
    except DbtInvocationError as exc:
        return (
            _fail(
                name,
                str(exc),
                "see docs/dbt-project.md (how profiles.yml is found); `dbt debug` in the "
                "project shows dbt's own view",
            ),
            None,
        )
    message = f"{target.describe()}: type {target.type}"
    note: tuple[str, ...] = ()
    both_duckdb = target.type == "duckdb" and settings.warehouse is WarehouseKind.DUCKDB
    # A type mismatch is the warehouse check's to report (d); this one checks the database.
    both_snowflake = target.type == "snowflake" and _dbt_on_snowflake(settings)
    check_profile = getattr(project, "check_profile", None)
    if both_duckdb and check_profile is None:
        note = ("the DuckDB path was not checked: this postload has no DbtProject.check_profile",)
    elif both_duckdb and check_profile is not None:
        try:
            check_profile(True, settings.duckdb_file)
        except DbtInvocationError as exc:
            return _fail(name, str(exc), "see docs/dbt-project.md (the DuckDB path rule)"), target
        message += f", opening postload's warehouse {settings.duckdb_file}"
    elif both_snowflake and check_profile is not None:
        try:
            check_profile(False)
        except DbtInvocationError as exc:
            return _fail(name, str(exc)), target
        message += f", building in the Snowflake database {target.database}"
        if shared := _schema_shared_with_postload(settings, target):
            return _warn(
                name,
                f"{message}, schema {target.schema}: the schema postload {shared}, so a model "
                "named like one of its tables would replace it",
                "give dbt a schema of its own: SNOWFLAKE_SCHEMA=ANALYTICS, then `postload "
                "blocks register` (postload names its raw and ops schemas in every statement: "
                "the block's schema is dbt's alone)",
            ), target
    return _ok(name, message, details=note), target


def _schema_shared_with_postload(settings: Settings, target: ProfileTarget) -> str | None:
    """What postload keeps in the target's schema, if it is the raw or the ops schema."""
    try:
        pipeline = settings.load_pipeline()
    except ConfigError:  # reported by the config check
        return None
    schema = (target.schema or "").strip('"').lower()
    if schema == pipeline.raw_schema.lower():
        return f"loads raw tables into (raw_schema: {pipeline.raw_schema})"
    if schema == pipeline.ops_schema.lower():
        return f"records its loads and builds in (ops_schema: {pipeline.ops_schema})"
    return None


def check_warehouse_matches_profile(settings: Settings, target: ProfileTarget) -> CheckResult:
    """(d) ``POSTLOAD_WAREHOUSE`` is the warehouse the profile target builds in."""
    name = "warehouse"
    wanted = settings.warehouse.value
    if target.type == wanted:
        return _ok(name, f"POSTLOAD_WAREHOUSE={wanted} and the dbt target is {target.type}")
    if target.type not in {k.value for k in WarehouseKind}:
        return _fail(
            name,
            f"the dbt {target.describe()} is a {target.type} target; postload loads and reads "
            "DuckDB or Snowflake only",
            "set the profile's `target:` (or DBT_TARGET) to a duckdb or snowflake target",
        )
    return _fail(
        name,
        f"POSTLOAD_WAREHOUSE={wanted} but the dbt {target.describe()} is a {target.type} target: "
        f"dbt would build outside the warehouse postload loads and reads",
        f"set POSTLOAD_WAREHOUSE={target.type}, or the profile's `target:` (or DBT_TARGET) to a "
        f"{wanted} target",
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def check_dbt_connection(
    settings: Settings, project: DbtProject, target: ProfileTarget
) -> CheckResult:
    """(c) dbt connects with the profile target (``dbt debug --connection``, in this process).

    A DuckDB warehouse file that does not exist yet is not created here: the first load does.
    """
    name = "dbt connection"
    duckdb_file = target.duckdb_file() if target.type == "duckdb" else None
    if duckdb_file is not None and str(duckdb_file) != ":memory:" and not duckdb_file.exists():
        return _ok(
            name,
            f"not tried: the DuckDB warehouse {duckdb_file} does not exist yet (the first load "
            "creates it)",
        )
    messages: list[str] = []

    def collect(event: Any) -> None:
        if event.info.name == "DebugCmdResult":
            messages.append(_ANSI.sub("", event.info.msg).strip())

    try:
        profiles_dir = project.profiles_dir()
        with project.profile_env(settings.duckdb_file):
            from dbt.cli.main import dbtRunner

            res = dbtRunner(callbacks=[collect]).invoke(
                [
                    "debug",
                    "--connection",
                    "--project-dir",
                    str(project.project_dir),
                    "--profiles-dir",
                    str(profiles_dir),
                    "--log-level",
                    "none",
                ]
            )
    except Exception as exc:  # dbt could not even start the command
        return _fail(name, f"dbt debug --connection could not run: {type(exc).__name__}: {exc}")
    if res.success:
        return _ok(name, f"dbt connects with {target.describe()}")
    why = " ".join(" ".join(m.split()) for m in messages if m and "check failed" not in m)
    why = why or str(res.exception or "dbt debug --connection failed")
    if target.type == "duckdb" and "lock" in why.lower():
        return _warn(
            name,
            f"the DuckDB warehouse is in use by another process: {why}",
            "nothing to fix if the stack or a flow run is using it; run `postload doctor` again "
            "when it is idle to check the connection",
        )
    return _fail(
        name,
        f"dbt cannot connect with {target.describe()}: {why}",
        "fix the target's credentials in profiles.yml (or the variables it reads); "
        "`dbt debug` in the project shows dbt's own report",
    )


# --- e. the Prefect API ------------------------------------------------------------------------


def prefect_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def check_prefect_api(client: SyncPrefectClient | None) -> CheckResult:
    """(e) ``PREFECT_API_URL`` is set and answers its health check. ``client`` is None when the
    URL is not set (no client is made then: it would start a temporary server)."""
    name = "Prefect API"
    url = prefect_api_url()
    if not url or client is None:
        return _warn(
            name,
            "no PREFECT_API_URL: flows would use a temporary local server, and the blocks, "
            "deployments and automations below cannot be checked",
            "start one with `postload stack` (or `prefect server start`), then export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (or your Prefect Cloud workspace's URL)",
        )
    error = client.api_healthcheck()
    if error is not None:
        return _fail(
            name,
            f"PREFECT_API_URL={_redact_url(url)} does not answer: {type(error).__name__}: {error}",
            "start the server (`postload stack`), or fix PREFECT_API_URL (and PREFECT_API_KEY "
            "for Prefect Cloud)",
        )
    return _ok(name, f"{_redact_url(url)} answers")


# --- f. blocks ---------------------------------------------------------------------------------


def _block_exists(client: SyncPrefectClient, name: str, slug: str) -> bool:
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_block_document_by_name(name, slug, include_secrets=False)
    except ObjectNotFound:
        return False
    return True


def check_blocks(
    settings: Settings, pipeline: PipelineConfig | None, client: SyncPrefectClient | None
) -> list[CheckResult]:
    """(f) The blocks these settings need: the Snowflake connector (warehouse snowflake), the dbt
    Cloud credentials (runner cloud), and the Fivetran webhook secret (some source has loader
    fivetran: ``POSTLOAD_FIVETRAN_WEBHOOK_SECRET`` or the Secret block)."""
    results = []
    if settings.warehouse is WarehouseKind.SNOWFLAKE:
        results.append(
            _required_block(
                client,
                settings.snowflake_block,
                "snowflake-connector",
                "POSTLOAD_WAREHOUSE=snowflake",
                "the Snowflake connector block exists",
                "set SNOWFLAKE_ACCOUNT, SNOWFLAKE_USER, SNOWFLAKE_PASSWORD (or "
                "SNOWFLAKE_PRIVATE_KEY_PATH), SNOWFLAKE_ROLE, SNOWFLAKE_WAREHOUSE and "
                "SNOWFLAKE_DATABASE, then run `postload blocks register`",
            )
        )
    if settings.dbt_runner is DbtRunnerKind.CLOUD:
        results.append(
            _required_block(
                client,
                settings.dbt_cloud_credentials_block,
                "dbt-cloud-credentials",
                "POSTLOAD_DBT_RUNNER=cloud",
                "the dbt Cloud credentials block exists",
                "set DBT_CLOUD_API_KEY and DBT_CLOUD_ACCOUNT_ID, then run "
                "`postload blocks register`",
            )
        )
    fivetran = [
        s.name
        for s in (pipeline.sources if pipeline else [])
        if isinstance(s.loader, FivetranLoader)
    ]
    if fivetran:
        results.append(_check_webhook_secret(settings, client, fivetran))
    if not results:
        results.append(
            _ok(
                "blocks",
                f"none needed (warehouse {settings.warehouse.value}, dbt {settings.dbt_runner.value}, "
                "no source with loader fivetran)",
            )
        )
    return results


def _required_block(
    client: Any, block: str, block_type: str, needed_by: str, exists: str, fix: str
) -> CheckResult:
    name = f"block {block}"
    if client is None:
        return _skip(name, "no Prefect API")
    if _block_exists(client, block, block_type):
        return _ok(name, exists)
    return _fail(
        name,
        f"{needed_by} needs the {block_type} block {block!r}, which is not on the Prefect API",
        fix,
    )


def _check_webhook_secret(
    settings: Settings, client: SyncPrefectClient | None, fivetran_sources: list[str]
) -> CheckResult:
    name = "Fivetran webhook secret"
    env_value = settings.fivetran_webhook_secret
    if env_value is not None and env_value.get_secret_value().strip():
        return _ok(name, f"from {FIVETRAN_WEBHOOK_SECRET_ENV}")
    if client is None:
        return _skip(
            name,
            f"{FIVETRAN_WEBHOOK_SECRET_ENV} is not set and the Secret block "
            f"{settings.fivetran_webhook_secret_block!r} needs the Prefect API",
        )
    try:
        _, source = settings.resolve_fivetran_webhook_secret()  # the value is dropped here
    except ConfigError as exc:
        url = prefect_api_url() or ""
        needed = (
            f"the receiver (`postload receiver`) needs it to check the webhooks of the Fivetran "
            f"source(s) {', '.join(fivetran_sources)}"
        )
        fix = (
            f"set {FIVETRAN_WEBHOOK_SECRET_ENV} to the secret your Fivetran webhook signs with, "
            "then run `postload blocks register` (see docs/fivetran-webhooks.md)"
        )
        if "api.prefect.cloud" in url:  # a Prefect Cloud webhook needs no secret of ours
            return _warn(
                name, f"{exc}; {needed}, unless a Prefect Cloud webhook receives them", fix
            )
        return _fail(name, f"{exc}; {needed}", fix)
    return _ok(name, f"from the {source}")


# --- g. deployments ----------------------------------------------------------------------------


def check_deployments(prefect_yaml: Path, client: SyncPrefectClient) -> CheckResult:
    """(g) Every deployment of ``prefect.yaml`` exists on the Prefect API (read by name)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from postload.local.serve import deployment_specs

    name = "deployments"
    if not prefect_yaml.is_file():
        return _warn(
            name,
            f"{prefect_yaml} not found: which deployments should exist is not known",
            "run from the postload checkout, or set POSTLOAD_PROJECT_DIR to it",
        )
    try:
        wanted = [s.name for s in deployment_specs(prefect_yaml)]
    except (ValueError, KeyError, TypeError) as exc:
        return _fail(name, f"{prefect_yaml} cannot be read: {exc}")
    found = client.read_deployments(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=wanted))
    )
    by_name = {d.name: d for d in found}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        return _fail(
            name,
            f"not on the Prefect API: {', '.join(missing)} (of {prefect_yaml.name}'s "
            f"{', '.join(wanted)})",
            "run `postload serve` (or `postload stack`) from the checkout, or "
            "`prefect deploy --all` for a work pool (then `postload schedules apply`)",
        )
    not_ready = [
        n for n in wanted if getattr(by_name[n].status, "value", by_name[n].status) == "NOT_READY"
    ]
    if not_ready:
        return _warn(
            name,
            f"all {len(wanted)} exist, but no runner or worker is polling {', '.join(not_ready)}: "
            "their runs would wait",
            "start `postload serve` (or `postload stack`), or a worker for their work pool",
        )
    return _ok(name, f"all {len(wanted)} exist: {', '.join(wanted)}")


# --- h. automations ----------------------------------------------------------------------------


def check_automations(client: SyncPrefectClient, slack_block: str | None = None) -> CheckResult:
    """(h) With a Slack notification block, every failure automation exists and is enabled;
    without one, a warning saying how to add it."""
    from postload.alerts import automation_names
    from postload.blocks import PAGERDUTY_BLOCK, SLACK_BLOCK

    name = "automations"
    slack_block = slack_block or SLACK_BLOCK
    if not _block_exists(client, slack_block, "custom-webhook"):
        return _warn(
            name,
            f"no notification block {slack_block!r}: failures, failed syncs and stale sources "
            "announce themselves nowhere",
            "set SLACK_WEBHOOK_URL (and optionally PAGERDUTY_INTEGRATION_KEY), run "
            "`postload blocks register`, then `postload automations apply`",
        )
    pagerduty = _block_exists(client, PAGERDUTY_BLOCK, "custom-webhook")
    expected = automation_names(pagerduty=pagerduty)
    missing, disabled = [], []
    for automation in expected:
        found = client.read_automations_by_name(automation)
        if not found:
            missing.append(automation)
        elif not any(a.enabled for a in found):
            disabled.append(automation)
    if missing or disabled:
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(missing)}")
        if disabled:
            parts.append(f"disabled: {', '.join(disabled)}")
        return _fail(
            name,
            f"the notification block {slack_block!r} exists but automations are "
            + "; ".join(parts),
            "run `postload automations apply`",
        )
    return _ok(
        name,
        f"all {len(expected)} applied, notifying {slack_block}"
        + (f" and {PAGERDUTY_BLOCK}" if pagerduty else ""),
    )


# --- dbt Cloud ---------------------------------------------------------------------------------


def check_dbt_cloud(settings: Settings, pipeline: PipelineConfig | None) -> list[CheckResult]:
    """dbt Cloud mode: the checks of a local dbt profile and connection do not apply (dbt Cloud
    builds with its environment's connection; postload parses with a parse-only profile of its
    own), and every source needs a job to build it."""
    name = "dbt Cloud jobs"
    results = [
        _ok(
            "dbt profile",
            "dbt Cloud builds with its own environment's connection; postload parses the project "
            "with a parse-only profile it writes under the project's target/ (no credentials)",
        ),
        _skip("dbt connection", "dbt Cloud connects, not postload"),
        _skip("warehouse", "dbt Cloud builds in its environment's warehouse"),
    ]
    if pipeline is None:
        return [*results, _skip(name, "needs the pipeline config")]
    default = settings.dbt_cloud_job_id
    jobless = [s.name for s in pipeline.sources if s.dbt_cloud_job_id is None and default is None]
    if jobless:
        return [
            *results,
            _fail(
                name,
                f"no dbt Cloud job builds source(s) {', '.join(jobless)}",
                "set POSTLOAD_DBT_CLOUD_JOB_ID (the default job) or `dbt_cloud_job_id` on each "
                "source in the pipeline config",
            ),
        ]
    jobs = sorted({job for s in pipeline.sources if (job := s.dbt_cloud_job_id or default)})
    return [
        *results,
        _ok(
            name,
            f"job(s) {', '.join(str(j) for j in jobs)} run `dbt build <selection>` through "
            "steps_override (one run per job for the sources pending together)",
        ),
    ]


# --- all of them -------------------------------------------------------------------------------


def run_checks(settings: Settings | None = None) -> Iterator[CheckResult]:
    """Every check in order, each result as soon as it is known (secret values scrubbed)."""
    from postload.dbt import DbtProject

    settings = settings or Settings()
    secrets = known_secrets(settings)
    project = DbtProject.from_settings(settings)

    def emit(results: Iterable[CheckResult]) -> Iterator[CheckResult]:
        # and the Snowflake block's credentials, once loaded for dbt's connection
        every = sorted({*secrets, *project.secrets()}, key=len, reverse=True)
        for result in results:
            yield _scrub_result(result, every)

    config_result, pipeline = check_config(settings)
    yield from emit([config_result])
    if _dbt_on_snowflake(settings):
        snowflake_results, dbt_can_run = check_dbt_on_snowflake(
            settings, project, api_available=bool(prefect_api_url())
        )
        yield from emit(snowflake_results)
        if not dbt_can_run:
            why = "dbt needs dbt-snowflake and its Snowflake connection to read the project"
            yield from emit(
                [
                    _skip(check, why)
                    for check in (
                        "dbt project",
                        "sources",
                        "dbt profile",
                        "dbt connection",
                        "warehouse",
                    )
                ]
            )
            yield from _api_checks(settings, pipeline, emit)
            return
    project_result, manifest = check_dbt_project(project)
    yield from emit([project_result])
    if pipeline is None or manifest is None:
        yield from emit([_skip("sources", "needs the pipeline config and the dbt project")])
    else:
        yield from emit(check_sources(pipeline, project, manifest, settings.pipeline_config_path))
    if settings.dbt_runner is DbtRunnerKind.CLOUD:
        # dbt Cloud builds with its environment's connection: no local profile to check
        yield from emit(check_dbt_cloud(settings, pipeline))
    else:
        profile_result, target = check_dbt_profile(settings, project)
        yield from emit([profile_result])
        if target is None:
            yield from emit(
                [
                    _skip("dbt connection", "needs the dbt profile"),
                    _skip("warehouse", "needs the dbt profile"),
                ]
            )
        else:
            if profile_result.failed:
                yield from emit([_skip("dbt connection", "needs a usable dbt profile")])
            else:
                yield from emit([check_dbt_connection(settings, project, target)])
            yield from emit([check_warehouse_matches_profile(settings, target)])
    yield from _api_checks(settings, pipeline, emit)


def _api_checks(
    settings: Settings,
    pipeline: PipelineConfig | None,
    emit: Callable[[Iterable[CheckResult]], Iterator[CheckResult]],
) -> Iterator[CheckResult]:
    """(e-h) The Prefect API, the blocks, the deployments and the automations."""
    if not prefect_api_url():
        yield from emit([check_prefect_api(None)])
        yield from emit(check_blocks(settings, pipeline, None))
        yield from emit(
            [_skip("deployments", "no Prefect API"), _skip("automations", "no Prefect API")]
        )
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        api_result = check_prefect_api(client)
        yield from emit([api_result])
        if api_result.status is not Status.OK:
            yield from emit(check_blocks(settings, pipeline, None))
            yield from emit(
                [
                    _skip("deployments", "the Prefect API does not answer"),
                    _skip("automations", "the Prefect API does not answer"),
                ]
            )
            return
        yield from emit(check_blocks(settings, pipeline, client))
        yield from emit([check_deployments(settings.project_dir / "prefect.yaml", client)])
        yield from emit([check_automations(client)])
