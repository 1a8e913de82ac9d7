"""The local stack's banner says where the Fivetran webhook secret is and how to read it, and
never shows the secret itself."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from postload.config import Settings
from postload.local.stack import LocalStack
from tests.conftest import suite_secret

SECRET = suite_secret("stack banner: webhook secret", "whsec-banner-7d41c0")
BLOCK = "postload-banner-test-secret"


def stack(tmp_path: Path, source: str | None, api_port: int = 4311) -> LocalStack:
    settings = Settings(_env_file=None, project_dir=tmp_path, fivetran_webhook_secret_block=BLOCK)
    local = LocalStack(settings, api_port=api_port, receiver_port=8799)
    local.webhook_secret, local.webhook_secret_source = SECRET, source
    return local


def read_command(banner: str) -> str:
    [line] = [line for line in banner.splitlines() if "Secret.load(" in line]
    return line.strip()


def test_a_secret_from_the_environment_is_named_by_its_variable(tmp_path: Path) -> None:
    banner = stack(tmp_path, "POSTLOAD_FIVETRAN_WEBHOOK_SECRET").banner()
    assert (
        "  webhook secret: $POSTLOAD_FIVETRAN_WEBHOOK_SECRET of the environment the stack "
        "started in (never printed)"
    ) in banner.splitlines()
    assert SECRET not in banner


def test_a_secret_in_a_block_names_the_block_and_the_command_that_reads_it(
    tmp_path: Path,
) -> None:
    banner = stack(tmp_path, f"Secret block {BLOCK!r}").banner()
    assert (
        f"  webhook secret: the Prefect Secret block {BLOCK!r} (never printed); to read it:"
    ) in banner.splitlines()
    command = read_command(banner)
    assert command.startswith("PREFECT_API_URL=http://127.0.0.1:4311/api ")
    assert command.endswith(
        f"-c 'from prefect.blocks.system import Secret; print(Secret.load(\"{BLOCK}\").get())'"
    )
    assert SECRET not in banner


def test_the_printed_command_reads_the_block_on_the_stacks_server(
    prefect_server: str, tmp_path: Path
) -> None:
    """Run as a person copies it from the banner (a shell, none of this process's Prefect
    settings): it prints the block's value."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    port = urlsplit(prefect_server).port
    assert port is not None
    banner = stack(tmp_path, f"Secret block {BLOCK!r}", api_port=port).banner()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    block_id = Secret(value=SECRET).save(BLOCK, overwrite=True)
    try:
        result = subprocess.run(
            ["bash", "-c", read_command(banner)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        with get_client(sync_client=True) as client:
            client.delete_block_document(block_id)
    assert result.returncode == 0, "the banner's command failed: " + shlex.quote(
        result.stderr.replace(SECRET, "<secret>")[-2000:]
    )
    read_the_secret = result.stdout.strip() == SECRET
    assert read_the_secret, "the banner's command printed something else than the block's value"


def test_before_start_the_banner_says_there_is_no_secret_yet(tmp_path: Path) -> None:
    assert "  webhook secret: not set up (the stack has not started)" in (
        stack(tmp_path, None).banner().splitlines()
    )
