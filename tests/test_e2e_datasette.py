"""datasette serves the bridge's log, with the plugin's pages, while the bridge is still
writing it."""

from __future__ import annotations

import uuid

import httpx
import openai

from tests.harness import TOKENS, Datasette, Mitmdump, wait_for


def ask(bridge: Mitmdump, prompt: str, **kw: object) -> None:
    client = openai.OpenAI(base_url=f"{bridge.url}/openai/v1", api_key=TOKENS["bob"], max_retries=0)
    client.responses.create(model="fake-tool", input=prompt, **kw)


def test_datasette_reads_while_bridge_writes(bridge: Mitmdump) -> None:
    first = f"first {uuid.uuid4().hex}"
    ask(bridge, first)
    wait_for(lambda: any(r["prompt"] == first for r in bridge.rows("user_prompts")))

    with Datasette(bridge.db_path) as ds:
        db = bridge.db_path.stem
        tables = httpx.get(f"{ds.url}/{db}.json", timeout=10).json()
        names = {t["name"] for t in tables["tables"]}
        assert {
            "interceptions",
            "token_usages",
            "user_prompts",
            "tool_usages",
            "model_thoughts",
        } <= names

        def prompts() -> list[str]:
            r = httpx.get(
                f"{ds.url}/{db}/user_prompts.json",
                params={"_shape": "array", "_size": "max"},
                timeout=10,
            )
            return [row["prompt"] for row in r.json()]

        assert first in prompts()
        # The bridge keeps writing while datasette has the file open.
        second = f"second {uuid.uuid4().hex}"
        ask(bridge, second, stream=True)
        assert wait_for(lambda: second in prompts())

        # Full-text search over prompts, and the joined rows, as a datasette user sees them.
        hits = httpx.get(
            f"{ds.url}/{db}/user_prompts.json",
            params={"_search": second.split()[1], "_shape": "array"},
            timeout=10,
        ).json()
        assert [h["prompt"] for h in hits] == [second]
        interception_id = hits[0]["interception_id"]
        row = httpx.get(
            f"{ds.url}/{db}/interceptions/{interception_id}.json",
            params={"_shape": "array"},
            timeout=10,
        ).json()[0]
        assert (row["initiator_id"], row["status"], row["streaming"]) == ("bob", "completed", 1)
        # The plugin's queries on the live file, found without -m: the request's story.
        story = httpx.get(
            f"{ds.url}/{db}/interception_story.json",
            params={"interception_id": interception_id, "_shape": "array"},
            timeout=10,
        ).json()
        assert [(s["what"], s["detail"]) for s in story][1] == ("prompt", second)
        assert story[-1]["what"] == "end" and story[-1]["detail"].startswith("completed")
        tools = httpx.get(
            f"{ds.url}/{db}/tool_usages.json",
            params={"interception_id": interception_id, "_shape": "array"},
            timeout=10,
        ).json()
        assert len(tools) == 1 and tools[0]["type"] == "function_call"
