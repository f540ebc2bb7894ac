"""A verifier peer that lies: the real CLI and peer code, with a judge that accepts every
drafted token (LIE=accept-all) or replaces the verifier's own token (LIE=wrong-token).

Its verdicts are signed with its real key and carry its real weights fingerprint: only an
audit by an honest verifier can tell. Run as `python lying_verifier.py peer ...` (the
arguments of `p2pspec peer`), with LIE in the environment.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from p2pspec.core.speculative import Verdict
from p2pspec.engines.decoding import Draft, Verifier
from p2pspec.peers.cli import main

LIE = os.environ.get("LIE", "accept-all")
honest_judge = Verifier.judge


def lying_judge(self: Verifier, base: int, draft: Draft, logits: np.ndarray) -> Verdict:
    honest = honest_judge(self, base, draft, logits)  # keeps the cache consistent
    if LIE == "accept-all":
        bonus = int(np.argmax(logits[-1]))
        return Verdict(accepted=len(draft.tokens), token=bonus)
    return Verdict(accepted=honest.accepted, token=(honest.token + 1) % logits.shape[-1])


Verifier.judge = lying_judge  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
