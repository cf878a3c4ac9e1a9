"""An offline demo: a fake provider, the real bridge, a few realistic exchanges, a summary.

    ./dev python -m devtools.demo [--dir demo-run]

Everything runs on loopback; nothing leaves the machine. The audit log, the config and the
saved flows stay in the output folder so they can be opened in datasette and mitmweb.
"""

from __future__ import annotations

import argparse
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import openai

from devtools.fake_upstream import FakeUpstream
from devtools.mitmdump_process import MitmdumpProcess, local_bridge_config

USERS = ("alice", "bob")


def demo_config(upstream_url: str) -> dict[str, Any]:
    tokens = {user: f"${{DEMO_TOKEN_{user.upper()}:-}}" for user in USERS}
    return local_bridge_config(upstream_url, "${DEMO_PROVIDER_KEY:-}", tokens)


def run_exchanges(base_url: str, tokens: dict[str, str]) -> list[str]:
    """The conversations a newcomer would try; returns one line per exchange."""
    alice = openai.OpenAI(base_url=base_url, api_key=tokens["alice"], max_retries=0)
    bob = openai.OpenAI(base_url=base_url, api_key=tokens["bob"], max_retries=0)
    lines = []

    stream = alice.responses.create(
        model="fake-text", input="Say hello to the audit log", stream=True
    )
    deltas = sum(1 for event in stream if event.type == "response.output_text.delta")
    lines.append(f"alice  streamed text          {deltas} text deltas")

    answer = bob.responses.create(model="fake-reasoning", input="Is 1013 prime? Think first.")
    lines.append(f"bob    buffered + reasoning   {answer.usage.output_tokens} output tokens")

    first = alice.responses.create(
        model="fake-tool",
        input="What's the weather in Paris?",
        tools=[
            {
                "type": "function",
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "enum": ["Paris", "Berlin"]}},
                    "required": ["city"],
                },
            }
        ],
    )
    call = next(item for item in first.output if item.type == "function_call")
    follow = alice.responses.create(
        model="fake-tool",
        input=[
            {"role": "user", "content": "What's the weather in Paris?"},
            call.model_dump(exclude_none=True),
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": '{"temperature_c": 18, "sky": "clear"}',
            },
        ],
    )
    lines.append(
        f"alice  tool call + follow-up  {call.name}({call.arguments}) -> "
        f"{follow.output_text[:40]!r}"
    )

    with bob.responses.stream(model="fake-cached", input="Summarise the style guide") as s:
        cached = s.get_final_response().usage.input_tokens_details.cached_tokens
    lines.append(f"bob    responses.stream       {cached} cached input tokens")

    try:
        alice.responses.create(model="fake-text", input="later, please", background=True)
    except openai.APIStatusError as e:
        lines.append(f"alice  background request     refused: {e.status_code} {e.body['message']}")

    stranger = openai.OpenAI(base_url=base_url, api_key="not-a-bridge-token", max_retries=0)
    try:
        stranger.responses.create(model="fake-text", input="let me in")
    except openai.AuthenticationError as e:
        lines.append(f"?      unknown token          refused: {e.status_code}")
    return lines


def summary(db_path: Path) -> str:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        out = ["", "What landed in the audit log:"]
        for table in (
            "interceptions",
            "user_prompts",
            "token_usages",
            "tool_usages",
            "model_thoughts",
        ):
            (count,) = conn.execute(f"select count(*) from {table}").fetchone()
            out.append(f"  {table:<15} {count:>3} rows")
        out.append("")
        out.append("  user   status      requests  input  cached  output")
        for row in conn.execute(
            "select coalesce(i.initiator_id, '(unknown)'), i.status, count(distinct i.id), "
            "coalesce(sum(t.input_tokens), 0), coalesce(sum(t.cache_read_input_tokens), 0), "
            "coalesce(sum(t.output_tokens), 0) from interceptions i left join token_usages t "
            "on t.interception_id = i.id group by 1, 2 order by 1, 2"
        ):
            out.append("  {:<6} {:<11} {:>8} {:>6} {:>7} {:>7}".format(*row))
        tools = [r[0] for r in conn.execute("select tool from tool_usages")]
        out.append(f"\n  tools called: {', '.join(tools) or 'none'}")
        return "\n".join(out)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", default="demo-run", help="output folder (default: demo-run)")
    args = parser.parse_args(argv)
    workdir = Path(args.dir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("aibridge.db", "aibridge.db-wal", "aibridge.db-shm", "flows.mitm"):
        (workdir / stale).unlink(missing_ok=True)

    tokens = {user: f"demo-{user}-{secrets.token_hex(8)}" for user in USERS}
    env = {"DEMO_PROVIDER_KEY": "sk-demo-" + secrets.token_hex(16)}
    env.update({f"DEMO_TOKEN_{user.upper()}": token for user, token in tokens.items()})
    with FakeUpstream() as upstream:
        bridge = MitmdumpProcess(
            workdir,
            demo_config(upstream.url),
            env=env,
            extra_args=["-w", str(workdir / "flows.mitm"), "--set", "store_streamed_bodies=true"],
        )
        bridge.start()
        try:
            print(f"fake provider at {upstream.url}, bridge at {bridge.url}\n")
            for line in run_exchanges(f"{bridge.url}/openai/v1", tokens):
                print("  " + line)
        finally:
            bridge.stop()  # a clean shutdown drains the recorder
    print(summary(bridge.db_path))
    rel = Path(args.dir)
    print(f"""
Open the log:      ./dev datasette {rel / "aibridge.db"}
Browse the flows:  ./dev mitmweb --rfile {rel / "flows.mitm"}
Rebuild the log from the flows (offline mode):
                   ./dev mitmdump -n --rfile {rel / "flows.mitm"} -s addon.py \\
                       --set aibridge_config={rel / "config.yaml"} --set aibridge_db=rebuilt.db""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
