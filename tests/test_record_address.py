"""Where the audit log lives (aibridge/record/address.py) and what the config says of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aibridge.config import ConfigError, load_config
from aibridge.record import address, postgres
from tests.harness import bridge_config


@pytest.mark.parametrize(
    ("given", "postgres_url"),
    [
        ("postgresql://h/db", True),
        ("postgres://h/db", True),
        ("PostgreSQL://h/db", True),
        ("aibridge.db", False),
        ("/var/lib/aibridge/postgresql://x", False),
        ("postgresql.db", False),
        ("", False),
    ],
)
def test_which_addresses_are_postgresql(given: str, postgres_url: bool) -> None:
    assert address.is_postgres(given) is postgres_url


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("postgresql://bridge:s3cret@db:5432/audit", "postgresql://bridge:***@db:5432/audit"),
        ("postgresql://bridge@db/audit", "postgresql://bridge@db/audit"),
        ("postgresql://db/audit", "postgresql://db/audit"),
        ("postgresql://bridge:@db/audit", "postgresql://bridge:***@db/audit"),
        ("postgresql://b:p%40ss@db/audit?sslmode=require", "postgresql://b:***@db/audit?…"),
        ("postgresql://db/audit?password=s3cret", "postgresql://db/audit?…"),
        ("postgresql://u:pa:ss@h1,h2:5433/d", "postgresql://u:***@h1,h2:5433/d"),
        ("postgresql://u:p@ss@h/d", "postgresql://u:***@h/d"),
        ("/srv/aibridge.db", "/srv/aibridge.db"),
    ],
)
def test_a_shown_address_has_no_password(given: str, shown: str) -> None:
    assert address.display(given) == shown


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://u:plain@h/d", "plain"),
        ("postgresql://u:p%40ss%2Fword@h/d", "p@ss/word"),
        ("postgresql://u:p%40ss%2Fword@h/d", "p%40ss%2Fword"),
        ("postgresql://h/d?password=inquery", "inquery"),
    ],
)
def test_error_text_is_scrubbed_of_the_password_in_either_spelling(url: str, secret: str) -> None:
    message = f'FATAL: something about "{secret}" went wrong'
    scrubbed = address.scrub(message, url)
    assert secret not in scrubbed and address.MASK in scrubbed


def write_config(tmp_path: Path, database: str) -> Path:
    config = bridge_config("https://api.openai.com", database=database)
    config["providers"][0]["api_key"] = "sk-test-provider-key"
    path = tmp_path / "aibridge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_postgresql_url_is_taken_as_it_is(tmp_path: Path) -> None:
    url = "postgresql://bridge@db.internal:5432/audit?sslmode=require"
    assert load_config(write_config(tmp_path, url)).database == url


def test_a_password_from_the_environment_reaches_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDIT_DB_PASSWORD", "from-env")
    path = write_config(tmp_path, "postgresql://bridge:${AUDIT_DB_PASSWORD}@db/audit")
    assert load_config(path).database == "postgresql://bridge:from-env@db/audit"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://bridge:topsecret@db/audit?nosuchoption=1",
        "postgresql://bridge:topsecret@db/audit?sslmode",
        "postgresql://bridge:top%zzsecret@db/audit",
    ],
)
def test_a_bad_url_names_the_key_and_file_and_hides_the_password(tmp_path: Path, url: str) -> None:
    path = write_config(tmp_path, url)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "database" in message and str(path) in message
    assert "topsecret" not in message and "top%zzsecret" not in message
    assert "postgresql://bridge:***@db/audit" in message


def test_a_url_without_the_driver_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "psycopg", None)
    with pytest.raises(ConfigError, match=r"aibridge\[postgresql\]"):
        load_config(write_config(tmp_path, "postgresql://bridge:pw@db/audit"))
