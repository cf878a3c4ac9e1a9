"""The health report load balancers read (issue 15)."""

from aibridge.health import health_report

OK_DB = {"state": "ok", "queue_rows": 0, "rows_written": 10, "rows_lost": 0}


def test_ok() -> None:
    status, body = health_report(version="1.2", configured=True, database=OK_DB, providers={})
    assert status == 200
    assert body == {
        "status": "ok",
        "version": "1.2",
        "configured": True,
        "database": OK_DB,
        "providers": {},
    }


def test_unconfigured_fails() -> None:
    status, body = health_report(version="1", configured=False, database=OK_DB, providers={})
    assert (status, body["status"]) == (503, "failing")
    assert "no working configuration" in body["problems"][0]


def test_no_writer_fails() -> None:
    for database in (None, {"state": "stopped", "queue_rows": 3}):
        status, body = health_report(version="1", configured=True, database=database, providers={})
        assert (status, body["status"]) == (503, "failing")
        assert body["database"]["state"] == "stopped"


def test_degraded_still_takes_traffic() -> None:
    retrying = {**OK_DB, "state": "retrying", "queue_rows": 40, "error": "OperationalError: locked"}
    status, body = health_report(version="1", configured=True, database=retrying, providers={})
    assert (status, body["status"]) == (200, "degraded")
    providers = {
        "openai": {
            "circuits": {"gpt-5": {"state": "open", "retry_after": 12}},
            "keys": {"active": 1, "parked": 1},
        },
        "anthropic": {"keys": {"active": 1, "disabled": 2}},
    }
    status, body = health_report(version="1", configured=True, database=OK_DB, providers=providers)
    assert (status, body["status"]) == (200, "degraded")
    assert body["problems"] == [
        "provider anthropic: 2 key(s) disabled",
        "provider openai: circuit open for gpt-5",
        "provider openai: 1 key(s) parked",
    ]
    assert body["providers"] == providers


def test_only_active_keys_are_fine() -> None:
    providers = {"openai": {"keys": {"active": 3}}}
    status, body = health_report(version="1", configured=True, database=OK_DB, providers=providers)
    assert (status, body["status"]) == (200, "ok") and "problems" not in body
