"""End-to-end: the real Qwen pair (embedded GGUF files) on llama.cpp, through a real mesh of
peer processes, greedy: every answer is exactly the verifier engine's own token-by-token
greedy decoding, at an adaptive k and at fixed k, for prompts and for a conversation."""

from __future__ import annotations

import functools
from pathlib import Path

import openai
import pytest
import trio

from p2pspec.engines import load_engine
from p2pspec.engines.local import greedy_decode
from p2pspec.runtime.client import Client
from p2pspec.runtime.gateway import serve
from p2pspec.tools.bench import BENCH_PROMPTS
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all

pytestmark = pytest.mark.e2e

VERIFIER = "qwen2.5-coder-1.5b-instruct"
DRAFTER = "qwen2.5-coder-0.5b-instruct"
ENGINE = ["--engine", "llama.cpp", "--threads", "1"]
TOKENS = 40


async def test_qwen_pair_through_a_mesh_answers_exactly_the_verifiers_own(tmp_path: Path) -> None:
    peers: list[PeerProcess] = []
    reference = load_engine(VERIFIER, engine="llama.cpp", threads=1, sequences=1, progress=False)
    try:
        v = await start_peer("v", "verifier", VERIFIER, workdir=tmp_path, extra_args=ENGINE)
        peers.append(v)
        d = await start_peer(
            "d", "drafter", DRAFTER, workdir=tmp_path, bootstrap=[v.address], extra_args=ENGINE
        )
        peers.append(d)
        accepted = drafted = 0
        async with Client([v.address]) as client:
            modes: list[tuple[int | str, bool]] = [("auto", True), (3, False), (1, False)]
            for i, prompt in enumerate(BENCH_PROMPTS):
                k, solo = modes[i % len(modes)]
                result = await client.generate(
                    prompt, max_new_tokens=TOKENS, draft_tokens=k, solo=solo
                )
                expected = greedy_decode(reference, result.prompt_token_ids, TOKENS)
                assert result.token_ids == expected, (prompt, k)
                if k != "auto":
                    accepted += result.stats["accepted"]
                    drafted += result.stats["drafted"]
            # A conversation: rendered with the chat template, answered as the verifier
            # itself would answer that rendering.
            conversation = [
                {"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "Name a sorting algorithm."},
                {"role": "assistant", "content": "Merge sort."},
                {"role": "user", "content": "Another one?"},
            ]
            result = await client.generate(messages=conversation, max_new_tokens=TOKENS)
            assert result.prompt_token_ids == reference.tokenizer.apply_chat_template(conversation)
            expected = greedy_decode(reference, result.prompt_token_ids, TOKENS)
            assert result.token_ids == expected
            # The same conversation through the OpenAI-compatible gateway, streamed to the
            # official client: the same text.
            async with trio.open_nursery() as nursery:
                serving = functools.partial(serve, client, listen="127.0.0.1:0")
                url = (await nursery.start(serving))[0]
                api = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)

                def chat() -> str:
                    events = api.chat.completions.create(
                        model=VERIFIER,
                        messages=conversation,  # type: ignore[arg-type]
                        max_tokens=TOKENS,
                        temperature=0,
                        stream=True,
                    )
                    return "".join(e.choices[0].delta.content or "" for e in events if e.choices)

                assert await trio.to_thread.run_sync(chat) == result.text
                nursery.cancel_scope.cancel()
        # models.md measured about 0.7 on this pair: a collapse would mean a broken drafter.
        assert drafted > 0 and accepted / drafted > 0.4
    finally:
        await stop_all(peers)
        reference.close()
