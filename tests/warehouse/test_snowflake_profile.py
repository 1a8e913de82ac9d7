"""The dbt profile's Snowflake connection, from the connector block: every way the block
authenticates that dbt-snowflake takes, as the variables the checked-in profile reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect_snowflake import SnowflakeConnector, SnowflakeCredentials
from pydantic import SecretBytes

from postload.warehouse._snowflake import (
    PROFILE_ENV_NAMES,
    UnsupportedProfileCredentialsError,
    dbt_profile_env,
    profile_secrets,
)
from tests.conftest import suite_secret

PASSWORD = suite_secret("Snowflake profile: password", "sf-prof-pw-a81e")
PASSPHRASE = suite_secret("Snowflake profile: key passphrase", "sf-prof-pass-66d0")
TOKEN = suite_secret("Snowflake profile: oauth token", "sf-prof-token-2f9b")
KEY = suite_secret("Snowflake profile: private key", "-----BEGIN PRIVATE KEY-----\nMIIsecret")


def block(**credentials: object) -> SnowflakeConnector:
    return SnowflakeConnector(
        credentials=SnowflakeCredentials(account="acct", user="u", role="LOADER", **credentials),
        database="DB",
        warehouse="WH",
        schema="ANALYTICS",
    )


def test_a_password_block() -> None:
    env = dbt_profile_env(block(password=PASSWORD))
    assert set(env) == set(PROFILE_ENV_NAMES)  # every one set: nothing left over from elsewhere
    assert {k: v for k, v in env.items() if v} == {
        "POSTLOAD_SNOWFLAKE_ACCOUNT": "acct",
        "POSTLOAD_SNOWFLAKE_USER": "u",
        "DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_PASSWORD": PASSWORD,
        "POSTLOAD_SNOWFLAKE_ROLE": "LOADER",
        "POSTLOAD_SNOWFLAKE_WAREHOUSE": "WH",
        "POSTLOAD_SNOWFLAKE_DATABASE": "DB",
        "POSTLOAD_SNOWFLAKE_SCHEMA": "ANALYTICS",
    }
    assert profile_secrets(env) == [PASSWORD]


def test_key_pair_blocks(tmp_path: Path) -> None:
    key_file = tmp_path / "rsa_key.p8"
    by_path = dbt_profile_env(block(private_key_path=key_file, private_key_passphrase=PASSPHRASE))
    assert by_path["POSTLOAD_SNOWFLAKE_PRIVATE_KEY_PATH"] == str(key_file)
    assert by_path["DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_PRIVATE_KEY_PASSPHRASE"] == PASSPHRASE
    assert by_path["DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_PASSWORD"] == ""
    assert by_path["POSTLOAD_SNOWFLAKE_AUTHENTICATOR"] == ""  # dbt picks key pair from the key

    inline = dbt_profile_env(
        block(private_key=SecretBytes(KEY.encode()), authenticator="snowflake_jwt")
    )
    assert (
        inline["DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_PRIVATE_KEY"] == KEY
    )  # PEM text, as dbt takes it
    assert profile_secrets(inline) == [KEY]


def test_other_authenticators() -> None:
    oauth = dbt_profile_env(block(authenticator="oauth", token=TOKEN))
    assert oauth["POSTLOAD_SNOWFLAKE_AUTHENTICATOR"] == "oauth"
    assert oauth["DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_TOKEN"] == TOKEN
    okta = dbt_profile_env(
        block(
            authenticator="okta_endpoint",
            endpoint="https://acme.okta.com",
            password=PASSWORD,
        )
    )
    assert okta["POSTLOAD_SNOWFLAKE_AUTHENTICATOR"] == "https://acme.okta.com"

    workload = SnowflakeConnector(
        credentials=SnowflakeCredentials(
            account="acct", authenticator="workload_identity", workload_identity_provider="aws"
        ),
        database="DB",
        warehouse="WH",
        schema="ANALYTICS",
    )
    with pytest.raises(UnsupportedProfileCredentialsError, match="'workload_identity'"):
        dbt_profile_env(workload)
