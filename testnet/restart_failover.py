"""Two verifiers on one host: the serving one killed mid-answer, both restarted elsewhere.

    python testnet/restart_failover.py --trials 10 --out docs/bench/restart_failover.json

Starts two verifiers (each with its own key file) and a drafter, tiny random models, as
`p2pspec peer` processes. Each trial streams a greedy answer, kills the serving verifier
with SIGKILL after the first chunk and checks the answer against the verifier's own
greedy decoding. Then both verifiers are restarted with their keys on new ports, so the
next trial's failover goes to a peer that lives at a new address; the next trial starts
once the drafter's directory holds both new addresses. Nothing imports this file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import trio

from p2pspec.engines import load_engine
from p2pspec.engines.local import greedy_decode
from p2pspec.runtime.client import Client
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all

VERIFIER, DRAFTER = "tiny-random:11", "tiny-random:11:noise=0.01"
ARGS = ["--threads", "1", "--advert-interval", "0.5"]
TOKENS = 64


async def _drafter_knows(drafter: PeerProcess, verifiers: list[PeerProcess]) -> None:
    """Until the drafter's directory holds every verifier at its current address."""
    want = {v.peer_id: v.address for v in verifiers}
    while True:
        async with Client([drafter.address]) as client:
            await client.refresh()
            held = {r.peer_id: r.addrs for r in client.peers("verifier")}
        if all(addr in held.get(peer, []) for peer, addr in want.items()):
            return
        await trio.sleep(0.2)  # the next advert comes within the advert interval


async def run(trials: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="p2pspec-restart-"))
    model = load_engine(VERIFIER, threads=1, progress=False)
    vs = {"v0": await start_peer("v0", "verifier", VERIFIER, workdir=work, extra_args=ARGS)}
    first = vs["v0"].address
    vs["v1"] = await start_peer(
        "v1", "verifier", VERIFIER, workdir=work, extra_args=ARGS, bootstrap=[first]
    )
    d = await start_peer("d", "drafter", DRAFTER, workdir=work, extra_args=ARGS, bootstrap=[first])
    rows = []
    try:
        for i in range(trials):
            with trio.fail_after(60):
                await _drafter_knows(d, list(vs.values()))
            prompt = f"kill the serving verifier {i}"
            killed = ""
            async with Client([d.address, *(v.address for v in vs.values())]) as client:
                async with client.stream(prompt, max_new_tokens=TOKENS, raw=True) as chunks:
                    async for chunk in chunks:
                        if not killed and chunk.tokens:
                            assert chunks.started is not None
                            serving = chunks.started.verifier_peer_id
                            killed = next(n for n, v in vs.items() if v.peer_id == serving)
                            vs[killed].kill()
                result = chunks.result
            assert result is not None
            want = greedy_decode(model, model.tokenizer.encode(prompt), TOKENS)
            rows.append(
                {
                    "killed": killed,
                    "identical": result.token_ids == want,
                    "verifier_failovers": result.stats["verifier_failovers"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            # Both restart on new ports: the killed one from the survivor, then the other.
            await vs[killed].process.wait()
            other = next(n for n in vs if n != killed)
            vs[killed] = await start_peer(
                killed, "verifier", VERIFIER, workdir=work, extra_args=ARGS,
                bootstrap=[vs[other].address, d.address],
            )  # fmt: skip
            vs[other].kill()
            await vs[other].process.wait()
            vs[other] = await start_peer(
                other, "verifier", VERIFIER, workdir=work, extra_args=ARGS,
                bootstrap=[vs[killed].address, d.address],
            )  # fmt: skip
    finally:
        await stop_all([*vs.values(), d])
    return {
        "trials": trials,
        "identical": sum(r["identical"] for r in rows),
        "rows": rows,
        "measured": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="sessions (default 10)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    report = trio.run(run, args.trials)
    print(f"identical: {report['identical']} of {report['trials']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
