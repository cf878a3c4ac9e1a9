"""``python -m aibridge export`` (aibridge/reading/export.py) on a log the real bridge wrote, from
its SQLite file and a PostgreSQL copy: CSV read back with the csv module and JSONL line by line
are the rows SQL gives, over inclusive UTC days, one person, other tables and views; hostile
text; rows streamed, not loaded."""

from __future__ import annotations

import csv
import io
import shutil
import sqlite3
import subprocess
import sys
import tracemalloc
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from aibridge.copy_log import copy_log
from aibridge.reading import export
from aibridge.reading.source import DateRange, Source
from aibridge.record.recorder import Recorder
from devtools.mitmdump_process import REPO
from tests.log_engines import read, with_password
from tests.postgres_server import PostgresServer
from tests.test_datasette_queries import UsageLog
from tests.test_reading_report import ALL_DAYS, _env, address, pg_log, usage_log

__all__ = ["address", "pg_log", "usage_log"]

TOKEN_SUMS = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_write_input_tokens",
    "uncached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)
JSON_COLUMNS = {"metadata", "usage", "args", "members"}


def run_export(address: str, *args: str) -> bytes:
    out = io.BytesIO()
    code = export.main(["--db", address, *args], out=out)
    assert code == 0
    return out.getvalue()


def expected_exchanges(
    address: str, since: str, until: str, user: str | None = None
) -> list[dict[str, Any]]:
    """The default export's rows, from the base tables of the same engine, summed here."""
    rows = read(address, "select * from interceptions")
    usage = read(address, "select * from token_usages")
    out = []
    for r in rows:
        if not since <= (r["started_at"] or "")[:10] <= until:
            continue
        if user is not None and (r["initiator_id"] or "(unauthenticated)") != user:
            continue
        mine = [u for u in usage if u["interception_id"] == r["id"]]
        row = {c: r[c] for c in export._EXCHANGE_COLUMNS if c in r}
        for c in TOKEN_SUMS:
            values = [u[c] for u in mine if u[c] is not None]
            row[c] = sum(values) if values else None
        costs = [u["estimated_cost_usd"] for u in mine if u["estimated_cost_usd"] is not None]
        row["estimated_cost_usd"] = sum(costs) if costs else None
        row["responses"] = len(mine)
        out.append(row)
    out.sort(key=lambda r: (r["started_at"], r["id"]))
    return out


def as_csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def assert_csv_equals(found: dict[str, str], wanted: dict[str, Any]) -> None:
    assert found.keys() == wanted.keys()
    for key, value in wanted.items():
        if key in JSON_COLUMNS and value is not None:
            assert orjson.loads(found[key]) == value, key  # JSON text of the same value
        elif isinstance(value, float):
            assert float(found[key]) == pytest.approx(value, rel=1e-12), key
        else:
            assert found[key] == as_csv_cell(value), key


def assert_json_equals(found: dict[str, Any], wanted: dict[str, Any]) -> None:
    assert list(found) == list(wanted)
    for key, value in wanted.items():
        if isinstance(value, float):
            assert found[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert found[key] == value, key


def csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


def jsonl_rows(data: bytes) -> list[dict[str, Any]]:
    assert data == b"" or data.endswith(b"\n")
    return [orjson.loads(line) for line in data.split(b"\n")[:-1]]


# --- the default: one row per exchange ---------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "until", "user"),
    [
        (*ALL_DAYS, None),
        ("2025-06-01", "2025-06-01", None),
        (*ALL_DAYS, "bob"),
        (*ALL_DAYS, "(unauthenticated)"),
        ("2024-01-01", "2024-12-31", None),  # nothing: only the header
    ],
)
def test_one_row_per_exchange_as_csv_and_jsonl(
    address: str, since: str, until: str, user: str | None
) -> None:
    args = ["--since", since, "--until", until] + ([] if user is None else ["--user", user])
    wanted = expected_exchanges(address, since, until, user)
    data = run_export(address, *args, "--format", "csv")
    header = data.split(b"\r\n", 1)[0].decode().split(",")
    # Who, what, when, status, tokens and cost first.
    assert header[:4] == ["started_at", "ended_at", "initiator_id", "api"]
    assert (
        header.index("status") < header.index("input_tokens") < header.index("estimated_cost_usd")
    )
    found = csv_rows(data)
    assert len(found) == len(wanted)
    for f, w in zip(found, wanted, strict=True):
        assert list(f) == header
        assert_csv_equals(f, {k: w[k] for k in header})
    lines = jsonl_rows(run_export(address, *args, "--format", "jsonl"))
    assert len(lines) == len(wanted)
    for f, w in zip(lines, wanted, strict=True):
        assert_json_equals(f, {k: w[k] for k in header})
    if since == ALL_DAYS[0] and user is None:
        assert len(found) == 21
        # An exchange without a usage row has no tokens; one unpriced has no cost.
        assert any(r["responses"] == "0" and r["total_tokens"] == "" for r in found)
        assert any(r["responses"] == "1" and r["estimated_cost_usd"] == "" for r in found)


def test_both_engines_export_the_same_exchanges(usage_log: UsageLog, pg_log: str) -> None:
    on = [
        jsonl_rows(
            run_export(where, "--since", ALL_DAYS[0], "--until", ALL_DAYS[1], "--format", "jsonl")
        )
        for where in (str(usage_log.db_path), pg_log)
    ]
    assert len(on[0]) == len(on[1]) == 21
    for a, b in zip(*on, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-12)
            else:
                assert a[key] == b[key], key


def test_the_ends_of_the_range_are_whole_days(usage_log: UsageLog, tmp_path: Path) -> None:
    db = tmp_path / "edges.db"
    shutil.copy(usage_log.db_path, db)
    edges = {
        0: "2025-06-01T00:00:00.000Z",
        1: "2025-06-01T23:59:59.999999+00:00",
        2: "2025-05-31T23:59:59.999Z",
        3: "2025-06-02T00:00:00.000Z",
    }
    conn = sqlite3.connect(db)
    with conn:
        for i, at in edges.items():
            conn.execute(
                "update interceptions set started_at = ? where id = ?", (at, usage_log.ids[i])
            )
    conn.close()
    found = csv_rows(run_export(str(db), "--since", "2025-06-01", "--until", "2025-06-01"))
    ids = [r["id"] for r in found]
    assert usage_log.ids[0] in ids and usage_log.ids[1] in ids
    assert usage_log.ids[2] not in ids and usage_log.ids[3] not in ids
    assert all(r["started_at"].startswith("2025-06-01") for r in found)
    assert ids[0] == usage_log.ids[0] and ids[-1] == usage_log.ids[1]  # in time order
    assert ids == [r["id"] for r in expected_exchanges(str(db), "2025-06-01", "2025-06-01")]


# --- other tables and views --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "relation", "time"),
    [
        ("prompts", "user_prompts", "created_at"),
        ("user_prompts", "user_prompts", "created_at"),
        ("tool_usages", "tool_usages", "created_at"),
        ("token_usages", "token_usages", "created_at"),
        ("thoughts", "model_thoughts", "created_at"),
        ("interceptions", "interceptions", "started_at"),
    ],
)
def test_another_table_is_its_rows_in_the_range(
    address: str, table: str, relation: str, time: str
) -> None:
    since, until = "2025-06-01", "2025-06-01"
    every = read(address, f"select * from {relation} order by {time}, id")
    for row in every:
        row.pop("prompt_search", None)  # PostgreSQL's search index column: not data
    wanted = [r for r in every if since <= r[time][:10] <= until]
    assert wanted
    if relation in ("user_prompts", "token_usages", "interceptions"):
        assert len(wanted) < len(every)  # the range leaves the other days out
    args = ["--table", table, "--since", since, "--until", until]
    found = csv_rows(run_export(address, *args))
    assert len(found) == len(wanted)
    for f, w in zip(found, wanted, strict=True):
        assert_csv_equals(f, w)
    lines = jsonl_rows(run_export(address, *args, "--format", "jsonl"))
    for f, w in zip(lines, wanted, strict=True):
        assert_json_equals(f, w)
    if relation == "tool_usages":
        # args is JSON: text in CSV, an object in JSONL.
        bash = next(r for r in lines if r["tool"] == "Bash")
        assert bash["args"]["command"] == "echo hi"
        assert orjson.loads(next(r for r in found if r["tool"] == "Bash")["args"]) == bash["args"]


def test_a_table_filtered_by_person(address: str) -> None:
    people = {
        r["id"]: r["initiator_id"]
        for r in read(address, "select id, initiator_id from interceptions")
    }
    for table, relation in (("prompts", "user_prompts"), ("token_usages", "token_usages")):
        every = read(address, f"select * from {relation} order by created_at, id")
        wanted = [r["id"] for r in every if people[r["interception_id"]] == "alice"]
        found = csv_rows(
            run_export(address, "--table", table, "--since", "2025-01-01", "--user", "alice")
        )
        assert [int(r["id"]) for r in found] == wanted
        assert wanted


def test_a_view_with_a_time_column(usage_log: UsageLog, address: str) -> None:
    wanted = read(address, "select * from v_failed_requests")
    wanted = [r for r in wanted if str(r["at"])[:10] == "2025-06-02"]
    args = ["--table", "v_failed_requests", "--since", "2025-06-02", "--until", "2025-06-02"]
    found = csv_rows(run_export(address, *args))
    assert sorted(r["interception_id"] for r in found) == sorted(
        r["interception_id"] for r in wanted
    )
    assert len(found) == len(wanted) == 9
    found = jsonl_rows(run_export(address, *args, "--user", "bob", "--format", "jsonl"))
    assert {r["user"] for r in found} == {"bob"}
    assert len(found) == sum(1 for r in wanted if r["user"] == "bob")
    days = jsonl_rows(
        run_export(
            address,
            "--table",
            "v_usage_per_user_per_day",
            "--since",
            "2025-06-01",
            "--until",
            "2025-06-01",
            "--format",
            "jsonl",
        )
    )
    assert {r["day"] for r in days} == {"2025-06-01"}
    assert {r["user"] for r in days} == {"alice", "bob"}


# --- what people's text holds ------------------------------------------------------------------

HOSTILE_PROMPTS = [
    'commas, "quotes", and\r\nCRLF',
    "lines\none\ntwo\n",
    "\rbare CR",
    "tab\tescape\x1b[31m bell\x07 del\x7f C1\x85",
    "line separator\u2028paragraph\u2029",
    "emoji 🧪 and ünïcode",
    "=cmd|' /C calc'!A0",  # a formula: exported as the text it is
    "",
    "x" * 200_000,
]


def _hostile_log(usage_log: UsageLog, tmp_path: Path) -> tuple[Path, list[int]]:
    db = tmp_path / "hostile.db"
    shutil.copy(usage_log.db_path, db)
    conn = sqlite3.connect(db)
    iid = usage_log.ids[5]
    with conn:
        ids = []
        for n, prompt in enumerate([*HOSTILE_PROMPTS, "a NUL\x00inside"]):
            cur = conn.execute(
                "insert into user_prompts (interception_id, prompt, created_at) values (?, ?, ?)",
                (iid, prompt, f"2025-06-01T12:00:{n:02d}.000000+00:00"),
            )
            ids.append(cur.lastrowid)
    conn.close()
    return db, ids


@pytest.mark.parametrize("engine_name", ["sqlite", "postgresql"])
def test_text_with_newlines_commas_quotes_and_controls_reads_back_equal(
    request: pytest.FixtureRequest, usage_log: UsageLog, tmp_path: Path, engine_name: str
) -> None:
    db, ids = _hostile_log(usage_log, tmp_path)
    where = str(db)
    if engine_name == "postgresql":
        where = str(request.getfixturevalue("postgres_url"))
        copy_log(str(db), where)  # NUL is not text in PostgreSQL: the copy repairs it
    args = ["--table", "prompts", "--since", "2025-06-01", "--until", "2025-06-01"]
    # The csv module's own default refuses fields over 128 KiB: a reader of long prompts
    # raises it.
    limit = csv.field_size_limit(1 << 24)
    try:
        found = {int(r["id"]): r["prompt"] for r in csv_rows(run_export(where, *args))}
    finally:
        csv.field_size_limit(limit)
    lines = {
        r["id"]: r["prompt"] for r in jsonl_rows(run_export(where, *args, "--format", "jsonl"))
    }
    nul = "a NUL\x00inside" if engine_name == "sqlite" else "a NUL\ufffdinside"
    for n, prompt in zip(ids, [*HOSTILE_PROMPTS, nul], strict=True):
        assert found[n] == prompt
        assert lines[n] == prompt


def test_text_that_is_not_unicode_does_not_stop_an_export(
    usage_log: UsageLog, tmp_path: Path
) -> None:
    """Another tool's rows: invalid UTF-8 and encoded lone surrogates in SQLite text, JSON
    columns that are not JSON or hold escaped lone surrogates."""
    db = tmp_path / "broken.db"
    shutil.copy(usage_log.db_path, db)
    conn = sqlite3.connect(db)
    iid = usage_log.ids[5]
    raw = {
        b"f\xff\x80o": "f\ufffd\ufffdo",  # not UTF-8
        b"s\xed\xa0\x80e": "s\ufffd\ufffd\ufffde",  # a UTF-16 surrogate encoded as UTF-8
        b"cut \xe2\x82": "cut \ufffd",  # a character cut short
    }
    with conn:
        for n, blob in enumerate(raw):
            conn.execute(
                "insert into user_prompts (interception_id, prompt, created_at) "
                "values (?, cast(? as text), ?)",
                (iid, blob, f"2025-06-01T12:00:{n:02d}.000000+00:00"),
            )
        args_text = ["not json {", '"\\ud800 lone"', '{"k": "\\udc00"}', "[1, 2"]
        for n, text in enumerate(args_text):
            conn.execute(
                "insert into tool_usages (interception_id, tool, args, created_at) "
                "values (?, ?, ?, ?)",
                (iid, f"t{n}", text, f"2025-06-01T12:01:{n:02d}.000000+00:00"),
            )
    conn.close()
    since = ["--since", "2025-06-01", "--until", "2025-06-01"]
    prompts = csv_rows(run_export(str(db), "--table", "prompts", *since))
    assert set(raw.values()) <= {r["prompt"] for r in prompts}
    lines = jsonl_rows(run_export(str(db), "--table", "prompts", *since, "--format", "jsonl"))
    assert set(raw.values()) <= {r["prompt"] for r in lines}
    tools = jsonl_rows(run_export(str(db), "--table", "tool_usages", *since, "--format", "jsonl"))
    args = {r["tool"]: r["args"] for r in tools}
    # Not parseable as JSON: the text as it is stored.
    assert [args[f"t{n}"] for n in range(len(args_text))] == args_text
    in_csv = {
        r["tool"]: r["args"]
        for r in csv_rows(run_export(str(db), "--table", "tool_usages", *since))
    }
    assert [in_csv[f"t{n}"] for n in range(len(args_text))] == args_text


# --- streamed, not loaded ----------------------------------------------------------------------


def _big_log(path: Path, rows: int, text_bytes: int) -> None:
    rec = Recorder(str(path), linger=0)
    rec.start()
    rec.close()
    conn = sqlite3.connect(path)
    filler = "e" * text_bytes
    with conn:
        conn.executemany(
            "insert into interceptions (id, started_at, initiator_id, api, status, error) "
            "values (?, ?, 'alice', 'responses', 'failed', ?)",
            (
                (
                    f"i{n:07d}",
                    f"2025-06-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}.{n:06d}Z",
                    filler,
                )
                for n in range(rows)
            ),
        )
    conn.close()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_memory_stays_flat_on_a_big_log(tmp_path: Path, fmt: str) -> None:
    db = tmp_path / "big.db"
    rows, text_bytes = 20_000, 2_000  # 40 MB of error text
    _big_log(db, rows, text_bytes)
    sink = _CountingSink()
    rng = DateRange(date(2025, 6, 1), date(2025, 6, 1))
    tracemalloc.start()
    try:
        with Source.open(str(db)) as src:
            n = export.export(src, sink, fmt, rng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == rows
    assert sink.lines == rows + (fmt == "csv")
    assert sink.size > rows * text_bytes
    # Loading the rows would hold the 40 MB; a batch of 1,000 rows about 5 MB.
    assert peak < 15_000_000, peak


class _CountingSink(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0
        self.lines = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.size += len(chunk)
        self.lines += chunk.count(b"\n")
        return len(chunk)


def test_postgresql_streams_through_a_server_side_cursor(pg_log: str) -> None:
    """While the first rows are written, the export's session is fetching from a cursor."""
    seen: list[str] = []
    application = "aibridge-export-test"
    url = f"{pg_log}?application_name={application}"

    class Watching(_CountingSink):
        def write(self, data: Any) -> int:
            if not seen:
                with psycopg.connect(pg_log) as other:
                    seen.append(
                        other.execute(
                            "select query from pg_stat_activity where application_name = %s",
                            (application,),
                        ).fetchone()[0]
                    )
            return super().write(data)

    sink = Watching()
    rng = DateRange(date(2025, 5, 31), date(2025, 6, 2))
    with Source.open(url) as src:
        n = export.export(src, sink, "jsonl", rng, batch=4)  # 21 rows: batches of 4, then 1
    assert n == 21 == sink.lines
    assert seen[0].lower().startswith("fetch forward 4 from"), seen


@pytest.mark.parametrize("batch", [1, 2, 20, 21, 22, 1000])
def test_every_row_once_whatever_the_batch(address: str, batch: int) -> None:
    rng = DateRange(date(2025, 5, 31), date(2025, 6, 2))
    sink = _CountingSink()
    with Source.open(address) as src:
        assert export.export(src, sink, "jsonl", rng, batch=batch) == 21
    out = io.BytesIO()
    with Source.open(address) as src:
        export.export(src, out, "jsonl", rng, batch=batch)
    ids = [r["id"] for r in jsonl_rows(out.getvalue())]
    assert len(set(ids)) == 21


# --- the command -------------------------------------------------------------------------------


def test_a_real_subprocess_to_stdout_and_to_a_file(usage_log: UsageLog, tmp_path: Path) -> None:
    db = str(usage_log.db_path)
    base = [sys.executable, "-m", "aibridge", "export", "--db", db, "--since", ALL_DAYS[0]]
    base += ["--until", ALL_DAYS[1]]
    done = subprocess.run(base, cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    wanted = expected_exchanges(db, *ALL_DAYS)
    found = csv_rows(done.stdout)
    assert [r["id"] for r in found] == [r["id"] for r in wanted]
    target = tmp_path / "out.jsonl"
    done = subprocess.run(
        [*base, "--format", "jsonl", "-o", str(target)], cwd=REPO, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    assert done.stderr.decode() == f"{target}: 21 rows\n"
    assert [r["id"] for r in jsonl_rows(target.read_bytes())] == [r["id"] for r in wanted]


def test_a_postgresql_password_is_never_printed(
    pg_log: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    secret = postgres_server.password
    target = tmp_path / "x.csv"
    command = [
        sys.executable,
        "-m",
        "aibridge",
        "export",
        "--since",
        ALL_DAYS[0],
        "-o",
        str(target),
    ]
    done = subprocess.run(
        [*command, "--db", with_password(pg_log, secret)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert secret not in done.stderr
    assert len(csv_rows(target.read_bytes())) == 21
    wrong = "s3cret-in-the-url"
    done = subprocess.run(
        [*command, "--db", with_password(pg_log, wrong)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert wrong not in done.stderr
    assert done.stderr.startswith("error: postgresql://aibridge:***@")


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ("nope", "no table or view 'nope' to export; choose one of: "),
        ("sqlite_master", "no table or view 'sqlite_master'"),
        ("_migrations", "no table or view '_migrations'"),
        ("user_prompts_fts", "no table or view 'user_prompts_fts'"),
        ("interceptions; drop table interceptions", "no table or view 'interceptions; drop"),
        ('x" union select', "no table or view 'x\" union select'"),
        ("INTERCEPTIONS", "no table or view 'INTERCEPTIONS'"),
        ("v_usage_per_model", "v_usage_per_model has no time column to filter on"),
        ("v_top_tools", "v_top_tools has no time column"),
    ],
)
def test_an_unknown_table_is_refused(
    capsys: pytest.CaptureFixture[str], address: str, table: str, says: str, tmp_path: Path
) -> None:
    target = tmp_path / "not-made.csv"
    code = export.main(["--db", address, "--table", table, "-o", str(target)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert says in err
    assert not target.exists()  # nothing written for a refused export
    if "choose one of" in says:
        for name in (
            "interceptions",
            "prompts",
            "tool_usages",
            "token_usages",
            "v_failed_requests",
        ):
            assert name in err
    assert read(address, "select count(*) as n from interceptions")[0]["n"] == 21


@pytest.mark.parametrize("fmt", ["xml", "CSV", "json", "", "csv,jsonl", "tsv"])
def test_an_unknown_format_is_refused(capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        export.main(["--db", "x.db", "--format", fmt])
    assert stopped.value.code == 2
    assert "argument --format: invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["2025-06-31", "June 1", "2025/06/01", "-1"])
def test_a_bad_date_is_refused(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        export.main(["--db", "x.db", "--since", text])
    assert stopped.value.code == 2
    assert "not a date (YYYY-MM-DD)" in capsys.readouterr().err


def test_what_cannot_be_done_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], usage_log: UsageLog, tmp_path: Path
) -> None:
    db = str(usage_log.db_path)
    cases = [
        (["--db", str(tmp_path / "missing.db")], "no such database"),
        (
            ["--db", db, "--table", "recorder_losses", "--user", "bob"],
            "--user does not apply to recorder_losses",
        ),
        (["--db", db, "-o", str(tmp_path / "no-dir" / "x.csv")], "No such file or directory"),
        (["--db", db, "-o", str(tmp_path)], "Is a directory"),
    ]
    for args, says in cases:
        code = export.main(args)
        out, err = capsys.readouterr()
        assert code == 2, args
        assert out == ""
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert says in err


def test_a_reader_that_stops_early_ends_the_export_quietly(tmp_path: Path) -> None:
    """`export | head -1`: the pipe closes mid-stream; no traceback, no complaint."""
    db = tmp_path / "big.db"
    _big_log(db, 5_000, 2_000)  # 10 MB: far more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "aibridge", "export", "--db", str(db), "--since", "2025-06-01"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"started_at,")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert err == b""
