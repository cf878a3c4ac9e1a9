"""Where the audit log lives: a SQLite file's path or a PostgreSQL URL (``database:`` in the
config, ``--set aibridge_db=``).

A URL may carry a password (``postgresql://bridge:secret@db/aibridge``, or ``${VAR}`` that
the config expands). It is a secret like a provider key: what the bridge prints or logs is
`display` of the address, and any error text passes through `scrub` first.
"""

from __future__ import annotations

import urllib.parse

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
MASK = "***"


def is_postgres(address: str) -> bool:
    return address.lower().startswith(POSTGRES_SCHEMES)


def _password(address: str) -> str | None:
    try:
        return urllib.parse.urlsplit(address).password
    except ValueError:
        return None


def display(address: str) -> str:
    """The address as it may be shown: a URL without its password (and without the query,
    which may hold one as ``?password=``); a path as it is."""
    if not is_postgres(address):
        return address
    try:
        parts = urllib.parse.urlsplit(address)
        netloc = parts.netloc.rpartition("@")
        host = netloc[2]
        user = netloc[0].partition(":")[0] if netloc[1] else ""
        masked = f"{user}:{MASK}@" if ":" in netloc[0] else (f"{user}@" if user else "")
        query = "?…" if parts.query else ""
        return f"{parts.scheme}://{masked}{host}{parts.path}{query}"
    except ValueError:
        return f"{address.partition('://')[0]}://{MASK}"


def scrub(text: str, address: str) -> str:
    """`text` (an error message) with any password of `address` replaced by the mask, as
    written in the URL and as decoded from it."""
    secrets: set[str] = set()
    raw = _password(address)
    if raw:
        secrets |= {raw, urllib.parse.unquote(raw)}
    try:
        for key, value in urllib.parse.parse_qsl(urllib.parse.urlsplit(address).query):
            if key == "password" and value:
                secrets.add(value)
    except ValueError:
        pass
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
