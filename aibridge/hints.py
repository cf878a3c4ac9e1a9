"""Hints of secrets: what logs, records and mitmweb show instead of a key or a token."""


def hint(secret: str) -> str:
    """A masked form of a secret: enough to tell keys apart, never enough to use one."""
    n = len(secret)
    keep = 4 if n >= 20 else 2 if n >= 10 else 1 if n >= 5 else 0
    if keep == 0:
        return "..."
    return f"{secret[:keep]}...{secret[-keep:]}"
