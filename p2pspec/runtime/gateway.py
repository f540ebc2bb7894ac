"""An OpenAI-compatible HTTP gateway to the mesh (`p2pspec serve`).

Starlette on hypercorn's trio worker, in the same trio run as one mesh `Client`: every
request is one mesh session. Served:

- `POST /v1/chat/completions`: messages (system, user, assistant), `max_tokens`,
  `temperature`, `top_p`, `seed`, `stop`, `stream` (server-sent events in OpenAI's chunk
  format, ending `data: [DONE]`), `usage` with token counts;
- `POST /v1/completions`: a raw text `prompt`, the same options;
- `GET /v1/models`: the models the mesh's verifiers serve;
- `GET /metrics`: Prometheus metrics of the gateway (requests by route and status, tokens
  streamed, time to first token);
- `GET /`: the mesh as `p2pspec status` shows it, as a page that refreshes itself every
  2 s, with plots of the gateway's tokens/s and the verifiers' acceptance over time
  (`GET /status.json`: the same data).

Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
HTTP status a client expects: 400 a bad request, 401 a wrong API key, 404 an unknown
model, 413 a prompt too long for the context, 429 every drafter or verifier busy, 503 no
peer to serve it, 502 a mesh failure. A client that disconnects mid-stream ends its
session on every peer. With `api_key`, requests need `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from p2pspec.runtime.client import Client, ClientError
from p2pspec.runtime.http import serve_asgi
from p2pspec.runtime.session import Chunk, Stream
from p2pspec.runtime.status import mesh_status

__all__ = ["HTTP_STATUS", "app", "serve"]

# A ClientError's code (docs/errors.md) as an HTTP status.
HTTP_STATUS = {
    "invalid_request": 400,
    "bad_request": 400,
    "context_overflow": 413,
    "overloaded": 429,
    "no_drafter": 503,
    "no_verifier": 503,
    "bootstrap_unreachable": 503,
}
DEFAULT_MAX_TOKENS = 256
STATUS_PAGE = Path(__file__).with_name("status_page.html")


class GatewayMetrics:
    """The gateway's own Prometheus metrics (one registry per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "p2pspec_gateway_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "p2pspec_gateway_completion_tokens", "Tokens sent to clients", registry=self.registry
        )
        self.tokens_sent = 0  # the same count, for the status page
        self.first_token = Histogram(
            "p2pspec_gateway_time_to_first_token_seconds",
            "From a request's arrival to its first committed chunk",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str = ""):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def _error(status: int, message: str, *, param: str | None = None, code: str = "") -> Response:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or None}}
    return JSONResponse(body, status_code=status)


def _client_error(e: ClientError) -> Response:
    status = HTTP_STATUS.get(e.code, 502)
    if e.code == "invalid_request" and "context" in str(e):
        status = 413  # the prompt and max_tokens do not fit the models' context
    return _error(status, str(e), code=e.code)


class _Body(msgspec.Struct, kw_only=True):
    """The fields of a (chat) completion request that the gateway reads; others are
    ignored, as OpenAI's server ignores what it does not know. JSON null is a field left
    out."""

    model: str
    messages: list[dict[str, Any]] | None = None  # roles and contents: models/chat.py
    prompt: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None


_FIELD = re.compile(r"at `\$\.(\w+)|required field `(\w+)`")


def _decode(raw: bytes) -> _Body:
    """The request's body, or _BadRequest naming the field that is wrong."""
    try:
        return msgspec.json.decode(raw, type=_Body)
    except msgspec.ValidationError as e:
        named = _FIELD.search(str(e))
        raise _BadRequest(400, str(e), param=named and (named[1] or named[2])) from None
    except msgspec.DecodeError:
        raise _BadRequest(400, "the body is not JSON") from None


def _options(body: _Body) -> dict[str, Any]:
    """The session options an OpenAI request asks for."""
    if body.n not in (None, 1):
        raise _BadRequest(400, "only n = 1 is served", param="n")
    max_tokens = body.max_completion_tokens or body.max_tokens
    return {
        "max_new_tokens": max_tokens or DEFAULT_MAX_TOKENS,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed or 0,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop or [],
    }


def app(client: Client, *, api_key: str | None = None) -> Starlette:
    """The gateway's ASGI app, over `client` (running, in the same trio run)."""
    metrics = GatewayMetrics()

    def served_models() -> list[str]:
        return sorted({r.model_id for r in client.peers("verifier")})

    async def parse(request: Request) -> _Body:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise _BadRequest(401, "a wrong or missing API key", code="invalid_api_key")
        body = _decode(await request.body())
        model = body.model
        if not client.peers("verifier"):
            await client.refresh()
        if model not in served_models():
            raise _BadRequest(
                404,
                f"the model {model!r} is served by no verifier of this mesh; "
                f"served: {', '.join(served_models()) or 'none'}",
                param="model",
                code="model_not_found",
            )
        return body

    async def complete(request: Request, *, chat: bool) -> Response:
        response = await _complete(request, chat=chat)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    async def _complete(request: Request, *, chat: bool) -> Response:
        arrived = time.perf_counter()
        try:
            body = await parse(request)
            options = _options(body)
            if chat:
                messages = body.messages
                if not messages:
                    raise _BadRequest(400, "'messages' must be a non-empty list", param="messages")
                stream = client.stream(messages=messages, **options)
            else:
                prompt = body.prompt
                if not prompt:
                    raise _BadRequest(400, "'prompt' must be a non-empty string", param="prompt")
                stream = client.stream(prompt, raw=True, **options)
            await stream.__aenter__()  # refusals (busy, no peer, too long) answer here
        except _BadRequest as e:
            return _error(e.status, str(e), param=e.param, code=e.code)
        except ClientError as e:
            return _client_error(e)
        reply = _Reply(body.model, chat=chat, metrics=metrics, arrived=arrived)
        if body.stream:
            return _Events(reply.events(stream), stream)
        try:
            async for chunk in stream:
                reply.add(chunk)
        except ClientError as e:
            return _client_error(e)
        finally:
            await stream.__aexit__(None, None, None)
        return JSONResponse(reply.whole(stream))

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def models(request: Request) -> Response:
        if not client.peers("verifier"):
            await client.refresh()
        data = [{"id": m, "object": "model", "owned_by": "p2pspec"} for m in served_models()]
        return JSONResponse({"object": "list", "data": data})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(request: Request) -> Response:
        return HTMLResponse(STATUS_PAGE.read_text(encoding="utf-8"))

    async def status_json(request: Request) -> Response:
        await client.refresh()
        rows = await mesh_status(client)
        return JSONResponse(
            {
                "time": time.time(),
                "gateway_tokens": metrics.tokens_sent,
                "peers": [row.as_dict() for row in rows],
            }
        )

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/", page, methods=["GET"]),
            Route("/status.json", status_json, methods=["GET"]),
        ]
    )


class _Events(StreamingResponse):
    """A streamed answer whose session ends with the response, however it ends. The
    events' generator closes the session in its `finally`, but a client that leaves before
    the first event cancels the response before the generator has started, and a generator
    never started runs no `finally`."""

    def __init__(self, events: AsyncIterator[str], stream: Stream) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()  # shielded; nothing left to do if the events did it


class _Reply:
    """One request's answer, in OpenAI's shapes."""

    def __init__(self, model: str, *, chat: bool, metrics: GatewayMetrics, arrived: float) -> None:
        self.model, self.chat = model, chat
        self.metrics, self.arrived = metrics, arrived
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.text: list[str] = []
        self.tokens = 0

    def _count(self, chunk: Chunk) -> None:
        if not self.tokens and chunk.tokens:
            self.metrics.first_token.observe(time.perf_counter() - self.arrived)
        self.metrics.tokens.inc(len(chunk.tokens))
        self.metrics.tokens_sent += len(chunk.tokens)

    def add(self, chunk: Chunk) -> None:
        self._count(chunk)
        if chunk.correction is not None:  # an audit caught the verifier: text redone
            self.text = ["".join(self.text)[: chunk.correction.keep_text]]
        self.text.append(chunk.text)
        self.tokens += len(chunk.tokens)

    def _object(self, *, delta: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if delta else "chat.completion"
        return "text_completion"

    def _choice(self, text: str, finish: str | None, *, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        key = "delta" if delta else "message"
        content: dict[str, Any] = {"content": text} if text or not delta else {}
        if not delta or not self.tokens:
            content["role"] = "assistant"
        return {"index": 0, key: content, "finish_reason": finish}

    def _envelope(self, choice: dict[str, Any], *, delta: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self._object(delta=delta),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def whole(self, stream: Stream) -> dict[str, Any]:
        result = stream.result
        assert result is not None
        out = self._envelope(
            self._choice(result.text, _finish(result.finish_reason), delta=False), delta=False
        )
        out["usage"] = _usage(len(result.prompt_token_ids), len(result.token_ids))
        return out

    async def events(self, stream: Stream) -> AsyncIterator[str]:
        """Server-sent events, one per committed chunk, then the finish and [DONE]. If the
        HTTP client goes, this generator is closed and the session is cancelled."""
        try:
            async for chunk in stream:
                if chunk.correction is not None:
                    continue  # a stream cannot take text back: corrections are rare, skipped
                event = self._envelope(self._choice(chunk.text, None, delta=True), delta=True)
                self._count(chunk)
                self.tokens += len(chunk.tokens)
                self.text.append(chunk.text)
                yield f"data: {json.dumps(event)}\n\n"
            result = stream.result
            assert result is not None
            # The answer's end that no chunk carried: a character cut between tokens, held
            # back until the session finished.
            sent = "".join(self.text)
            rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
            last = self._envelope(
                self._choice(rest, _finish(result.finish_reason), delta=True), delta=True
            )
            last["usage"] = _usage(len(result.prompt_token_ids), len(result.token_ids))
            yield f"data: {json.dumps(last)}\n\n"
        except ClientError as e:
            error = {"error": {"message": str(e), "type": "server_error", "code": e.code}}
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            await stream.__aexit__(None, None, None)
        yield "data: [DONE]\n\n"


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def serve(
    client: Client,
    *,
    listen: str = "127.0.0.1:8000",
    api_key: str | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined, unused-ignore]
) -> None:
    """Serve the gateway at `listen` (HOST:PORT; port 0: any free one) until cancelled;
    `task_status.started` gets the bound URLs. UserError naming --listen where it
    cannot listen."""
    asgi: Any = app(client, api_key=api_key)  # an ASGI app, which hypercorn's types miss
    await serve_asgi(asgi, listen, flag="--listen", task_status=task_status)
