"""Chat templates rendered as transformers renders them, without transformers.

A model's chat template (Jinja, shipped in its tokenizer config or its GGUF metadata)
turns a conversation into the text the model was trained on. Engines that do not load
transformers (llama.cpp) render it here; the environment matches transformers'
`apply_chat_template` (a sandbox, trim_blocks and lstrip_blocks, the loopcontrols
extension, the `generation` tag, its `tojson`, `raise_exception` and `strftime_now`), so
both engines give the same prompt text, and so the same token ids, for the same
conversation (tests/test_models.py compares it with transformers' own renderer).
Transformers' renderer is not called: importing it would load transformers into every
llama.cpp peer, a path kept free of torch and transformers (tests/test_engines.py).

`check_messages` is the one check of a conversation's shape, for every engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

from p2pspec.core.errors import InvalidRequestError

__all__ = ["ROLES", "Message", "check_messages", "render"]

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]


def check_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Plain dicts of a conversation, or InvalidRequestError saying what is wrong with it."""
    if not messages:
        raise InvalidRequestError("the conversation is empty: give at least one message")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidRequestError(
                f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        if not isinstance(content, str):
            raise InvalidRequestError(f"message {i}: content must be a string")
        out.append({"role": str(role), "content": content})
    if not any(m["content"].strip() for m in out):
        raise InvalidRequestError("the conversation is empty: every message is blank")
    return out


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: object,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`, which transformers' templates use to
        mark the assistant's tokens (for training masks): rendered as its body."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render(template: str, messages: Sequence[Message], **special_tokens: str) -> str:
    """The prompt text of `messages` followed by the assistant's generation prompt."""
    import jinja2

    try:
        return str(
            _compile(template).render(
                messages=check_messages(messages),
                add_generation_prompt=True,
                tools=None,
                documents=None,
                **special_tokens,
            )
        )
    except jinja2.exceptions.TemplateError as e:
        raise InvalidRequestError(f"the model's chat template refused the conversation: {e}") from e
