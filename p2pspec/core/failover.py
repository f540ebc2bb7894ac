"""A session's verifier failover, as rules with no I/O (the sans-I/O style of h11).

The drafter (peers/drafter.py) asks the scheduler for a verifier, serves the session on it,
and tells this machine what happened; the machine answers what to do next: try another
verifier (excluding the ones that failed or were full), wait and try them all again, or
refuse the session with a code and a reason. The time is passed in, so every rule is
tested with no network, no clock and no model (tests/test_failover_rules.py).

The rules (design.md: the committed tokens are a session's only essential state, so any
verifier can take over from them):

- a verifier that fails or hangs mid-session is excluded and counts as a failover; past
  `max_failovers` the session ends as `verifier_failed`;
- a verifier that cannot be reached is excluded, but is no failover (it never served);
- a verifier that refuses for capacity before the session started is busy, not broken:
  excluded, no failover; the session ends `overloaded` only when every one is busy;
- once verifiers have failed and none is left, the session waits for one to come back (a
  cut link that heals) for `reconnect_window_s`, retrying all of them after pauses that
  double from `retry_initial_s` to `retry_max_s`; a verifier that serves again starts a
  fresh window for the next loss;
- no verifier at all, before any failed: `no_verifier`.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pspec.core import wire

__all__ = ["RETRY_INITIAL_S", "RETRY_MAX_S", "Failover", "Refuse", "Wait"]

# Waiting for a failed verifier to come back (no other is left): first and longest pause.
RETRY_INITIAL_S = 0.25
RETRY_MAX_S = 2.0


@dataclass(frozen=True)
class Wait:
    """Pause this long, then try every verifier again."""

    seconds: float


@dataclass(frozen=True)
class Refuse:
    """End the session: its refusal's error code (docs/errors.md) and reason."""

    code: str
    why: str


class Failover:
    """Which verifiers a session may still try, and what to do when none is left."""

    def __init__(
        self,
        stats: wire.SessionStats,
        *,
        max_failovers: int,
        reconnect_window_s: float,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.stats = stats  # verifier_failovers and corrections are counted there
        self.max_failovers = max_failovers
        self.reconnect_window_s = reconnect_window_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.failed: set[str] = set()
        self.full: set[str] = set()  # refused for capacity: busy, not broken
        self.lost_at: float | None = None  # when every verifier had failed, if one has
        self.retry_s = retry_initial_s

    def exclude(self) -> frozenset[str]:
        """The verifiers not to place the session on now."""
        return frozenset(self.failed | self.full)

    def no_verifier(self, now: float) -> Wait | Refuse:
        """The scheduler found no verifier to try."""
        # Once a verifier has failed the session waits, also when the records lapse
        # meanwhile (a cut link stops their refreshes too).
        waiting = bool(self.failed) or self.lost_at is not None
        if waiting and self.stats.verifier_failovers <= self.max_failovers:
            self.lost_at = now if self.lost_at is None else self.lost_at
            if now - self.lost_at < self.reconnect_window_s:
                wait = Wait(self.retry_s)
                self.retry_s = min(2 * self.retry_s, self.retry_max_s)
                self.failed.clear()  # try them again: a cut link may have healed
                return wait
        if waiting:
            return Refuse(
                "verifier_failed",
                f"{self.stats.verifier_failovers} verifier failures; none answered again "
                f"within {self.reconnect_window_s:g} s",
            )
        if self.full:
            return Refuse("overloaded", "every compatible verifier is at capacity")
        return Refuse("no_verifier", "no compatible verifier with free capacity")

    def unreachable(self, verifier: str) -> None:
        """The verifier could not be reached (dial, key exchange): try another."""
        self.failed.add(verifier)

    def busy(self, verifier: str) -> None:
        """The verifier refused the session for capacity before it started."""
        self.full.add(verifier)

    def failed_mid_session(self, verifier: str, *, caught: bool = False) -> Refuse | None:
        """The verifier failed, hung, or (`caught`) an audit proved it wrong, after it
        served: None to go on with another, or the session's end."""
        self.failed.add(verifier)
        self.stats.verifier_failovers += 1
        self.stats.corrections += caught
        if self.stats.verifier_failovers > self.max_failovers:
            return Refuse("verifier_failed", f"{len(self.failed)} verifiers failed")
        self.lost_at, self.retry_s = None, self.retry_initial_s  # it served: a fresh window
        return None
