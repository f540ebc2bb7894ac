"""Audits on a real mesh: a lying verifier process is caught by an honest one, banned, and
the answer is corrected to the verifier model's own output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
from support import local_tokens, logged

from p2pspec.core.speculative import SamplingParams
from p2pspec.core.transcript import check_transcript
from p2pspec.runtime.client import Client
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.05"  # disagrees with the verifier often enough to show lies
LIAR = Path(__file__).resolve().parent / "helpers" / "lying_verifier.py"
PROMPT = "an answer worth checking"
NEW_TOKENS = 40
STEP_S = 60.0
# Stated bound: a liar is caught in the first audited round in which it lies, and with a
# drafter this noisy it lies (accepts a token the model would not pick, or changes one)
# within a few rounds.
MAX_AUDITED_ROUNDS = 5
PARAMS = {
    "accept-all": SamplingParams(),
    "wrong-token": SamplingParams(),
    "below-the-margin": SamplingParams(),
    # Sampled: the auditor re-runs the same draws (same draft, q and seed) and disagrees.
    "accept-all-sampled": SamplingParams(temperature=0.8, seed=3),
}


@pytest.mark.parametrize(
    "lie", ["accept-all", "wrong-token", "accept-all-sampled", "below-the-margin"]
)
async def test_a_lying_verifier_is_caught_banned_and_its_tokens_corrected(
    tmp_path: Path, lie: str
) -> None:
    """below-the-margin: the same lies, with an audit margin no disagreement reaches, as
    floating-point near-ties would be: logged, never punished (so the lies stand)."""
    config = tmp_path / "drafter.toml"
    margin = 1e6 if lie == "below-the-margin" else 1.0
    config.write_text(f"audit_fraction = 1.0\naudit_margin = {margin}\n")
    fast = ["--threads", "1"]
    peers: list[PeerProcess] = []
    try:
        liar = await start_peer(
            "liar",
            "verifier",
            VERIFIER,
            workdir=tmp_path,
            extra_args=fast,
            program=[sys.executable, str(LIAR)],
            env={
                "LIE": {"below-the-margin": "wrong-token", "accept-all-sampled": "accept-all"}.get(
                    lie, lie
                )
            },
            ready_timeout_s=120,
        )
        peers.append(liar)
        honest = await start_peer(
            "honest",
            "verifier",
            VERIFIER,
            workdir=tmp_path,
            bootstrap=[liar.address],
            extra_args=fast,
            ready_timeout_s=120,
        )
        peers.append(honest)
        drafter = await start_peer(
            "d",
            "drafter",
            DRAFTER,
            workdir=tmp_path,
            bootstrap=[liar.address, honest.address],
            extra_args=[*fast, "--config", str(config)],
            ready_timeout_s=120,
        )
        peers.append(drafter)
        async with Client([honest.address]) as client:
            with trio.fail_after(STEP_S):
                while len(client.peers("verifier")) < 2:  # the drafter's view may lag
                    await client.refresh()
                stream = client.stream(
                    PROMPT,
                    max_new_tokens=NEW_TOKENS,
                    raw=True,
                    draft_tokens=4,
                    verifier=liar.peer_id,
                    temperature=PARAMS[lie].temperature,
                    seed=PARAMS[lie].seed,
                )
                corrections = []
                async with stream as chunks:
                    async for chunk in chunks:
                        if chunk.correction is not None:
                            corrections.append(chunk.correction)
            result = chunks.result
        assert result is not None
        expected = local_tokens(VERIFIER, DRAFTER, PROMPT, NEW_TOKENS, PARAMS[lie])
        if lie == "below-the-margin":
            assert logged(drafter, "audit_near_tie") and not logged(drafter, "verifier_caught")
            assert corrections == [] and result.token_ids != expected
            return
        # The answer is the verifier model's own, whatever the liar said.
        assert result.token_ids == expected
        assert result.verifier_peer_id == liar.peer_id  # where the session started
        # Caught within the stated number of audited rounds, with both signed rounds.
        (caught,) = logged(drafter, "verifier_caught")
        assert caught["verifier"] == liar.peer_id and caught["auditor"] == honest.peer_id
        audits_before = [
            e for e in logged(drafter, "audit_passed") if e.get("verifier") == liar.peer_id
        ]
        assert len(audits_before) + 1 <= MAX_AUDITED_ROUNDS
        assert [c.verifier_peer_id for c in corrections] == [liar.peer_id]
        assert len(corrections[0].evidence) == 2
        assert result.stats["corrections"] == 1
        assert result.stats["correction_events"][0]["verifier_peer_id"] == liar.peer_id
        # Banned: no round after the correction went to the liar, and the transcript the
        # client kept (the liar's rounds dropped) checks.
        assert result.transcript is not None
        assert check_transcript(result.transcript) == []
        assert {r.verifier_peer_id for r in result.transcript.rounds} == {honest.peer_id}
        assert logged(drafter, "verifier_banned")
    finally:
        await stop_all(peers)
