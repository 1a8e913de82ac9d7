"""What postload uses of prefect-dbt through its public API only, and the version check that
decides whether its changes to prefect-dbt's internals (``_prefect_dbt``) may be used.

This module must import on any prefect-dbt version: it is what runs dbt when that check fails.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_client
from prefect.client.orchestration import PrefectClient
from prefect.utilities.templating import (
    PLACEHOLDER_CAPTURE_REGEX,
    PlaceholderType,
    determine_placeholder_type,
)
from prefect_dbt import PrefectDbtSettings

logger = logging.getLogger(__name__)

# The one prefect-dbt release ``_prefect_dbt`` and ``_node_process`` were written and tested
# against: they override and read private members of its runner and tracker
# (``_create_unified_callback``, ``_callback_worker``, ``_event_queue``,
# ``_stop_callback_processor``, ``_manifest``, ``_node_events``, ``prefect_dbt.core._tracker``…),
# which any other release may change without notice. pyproject.toml pins the same version.
TESTED_PREFECT_DBT_VERSION = "0.7.25"
NODE_TASK_THREAD_PREFIX = "prefect-dbt-node"

_warned = threading.Event()


def installed_prefect_dbt_version() -> str:
    return importlib.metadata.version("prefect-dbt")


def internals_supported() -> bool:
    """Whether the installed prefect-dbt is the tested one, so postload's node task runners
    (thread or process mode) may be used; otherwise say once that plain ``PrefectDbtRunner``
    runs dbt instead."""
    installed = installed_prefect_dbt_version()
    if installed == TESTED_PREFECT_DBT_VERSION:
        return True
    if not _warned.is_set():
        _warned.set()
        logger.warning(
            "prefect-dbt %s is installed; postload's node task runners are tested with "
            "prefect-dbt %s only (they rely on its internals), so dbt runs through "
            "prefect-dbt's own PrefectDbtRunner: node tasks in its own threads, the DuckDB "
            "warehouse opened by dbt alone. Install prefect-dbt==%s for postload's runners",
            installed,
            TESTED_PREFECT_DBT_VERSION,
            TESTED_PREFECT_DBT_VERSION,
        )
    return False


class DbtSettings(PrefectDbtSettings):
    @contextmanager
    def resolve_profiles_yml(self) -> Iterator[str]:
        """profiles.yml as is when it has no Prefect block or variable to resolve.

        prefect-dbt resolves ``{{ prefect.blocks... }}`` / ``{{ prefect.variables... }}``
        placeholders and ``$ref`` block references into a temporary copy on every invocation,
        through two API clients of its own (~70 ms), also when there is nothing to resolve; any
        other text (dbt's own ``env_var``) it leaves alone.
        """
        text = (self.profiles_dir / "profiles.yml").read_text(encoding="utf-8")
        prefect_types = (PlaceholderType.BLOCK_DOCUMENT, PlaceholderType.VARIABLE)
        if "$ref" in text or any(
            determine_placeholder_type(name) in prefect_types
            for _, name in PLACEHOLDER_CAPTURE_REGEX.findall(text)
        ):
            with super().resolve_profiles_yml() as resolved:
                yield resolved
        else:
            yield str(self.profiles_dir)


@functools.cache
def unused_client(api_url: str | None) -> PrefectClient:
    """prefect-dbt 0.7.25 builds a PrefectClient per runner and never uses it; building one loads
    the CA bundle (~35 ms), so runners get this one, built once per API URL and never opened."""
    return get_client()
