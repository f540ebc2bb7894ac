"""`p2pspec generate`: a prompt or a conversation answered here (--local, both models in
this process) or by the mesh (--bootstrap)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from p2pspec.core.errors import InvalidRequestError, UserError
from p2pspec.peers.commands import mesh_config

DEFAULT_VERIFIER = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFTER = "qwen2.5-coder-0.5b-instruct"
# Options of `generate` that only --local uses, with their defaults.
LOCAL_ONLY = {
    "--drafter": ("drafter", None),
    "--verifier": ("verifier", None),
    "--engine": ("engine", "auto"),
    "--threads": ("threads", 0),
    "--device": ("device", "auto"),
    "--dtype": ("dtype", None),
    "--llama-settings": ("llama_settings", "lossless"),
}


def conversation(args: argparse.Namespace) -> list[dict[str, str]]:
    """The messages of --system, --messages and PROMPT, in that order; [] when PROMPT alone
    is the prompt (so that --raw still applies to it)."""
    if not args.system and not args.messages:
        if not args.prompt.strip():
            raise InvalidRequestError("the prompt is empty: give some text to answer")
        return []
    if args.raw:
        raise UserError("--raw does not apply to a conversation (--system, --messages)")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.messages:
        try:
            loaded = json.loads(Path(args.messages).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"--messages {args.messages}: {e}") from None
        if not isinstance(loaded, list) or not all(isinstance(m, dict) for m in loaded):
            raise UserError(f"--messages {args.messages}: expected a JSON list of messages")
        messages += loaded
    if args.prompt.strip():
        messages.append({"role": "user", "content": args.prompt})
    from p2pspec.models.chat import check_messages

    return check_messages(messages)


def encode_prompt(lm: Any, prompt: str, raw: bool, messages: list[dict[str, str]]) -> list[int]:
    if messages:
        if not lm.tokenizer.has_chat_template:
            raise InvalidRequestError("this model has no chat template for a conversation")
        return list(lm.tokenizer.apply_chat_template(messages))
    if not raw and lm.tokenizer.has_chat_template:
        return list(lm.tokenizer.apply_chat_template(prompt))
    return list(lm.tokenizer.encode(prompt))


def generate_local(args: argparse.Namespace) -> int:
    # Imported here so that `p2pspec --help` and argument errors stay fast.
    from p2pspec.engines import check_compatible, load_engine
    from p2pspec.engines.local import GenerationStats, StopChecker, TextDeltas, sampling_params
    from p2pspec.peers.local import LocalEngine

    params = sampling_params(args.temperature, args.top_k, args.top_p, args.seed)
    k = 4 if args.draft_tokens == "auto" else args.draft_tokens
    if k < 0:
        raise InvalidRequestError(f"--draft-tokens must be >= 0, got {k}")
    if args.max_new_tokens <= 0:
        raise InvalidRequestError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    messages = conversation(args)

    def load(spec: str) -> Any:
        return load_engine(
            spec,
            engine=args.engine,
            dtype=args.dtype,
            threads=args.threads,
            device=args.device,
            sequences=2,
            settings=args.llama_settings,
        )

    verifier = load(args.verifier or DEFAULT_VERIFIER)
    # --draft-tokens 0: the verifier decodes alone, the reference every mode must equal.
    drafter = load(args.drafter or DEFAULT_DRAFTER) if k else verifier
    check_compatible(drafter, verifier)
    engine = LocalEngine(drafter, verifier, draft_tokens=k)
    prompt_ids = encode_prompt(verifier, args.prompt, args.raw, messages)
    stats = GenerationStats()
    checker = StopChecker(verifier, args.stop, args.max_new_tokens)
    tokens: list[int] = []
    deltas = TextDeltas(verifier)
    for chunk in engine.stream(
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        params=params,
        stop=args.stop,
        stats=stats,
    ):
        tokens.extend(chunk)
        if not args.json:
            sys.stdout.write(deltas.push(chunk))
            sys.stdout.flush()
    _, reason = checker.cut(tokens)
    finish = reason or "length"
    text = checker.text(tokens, finish)
    if args.json:
        out = {
            "text": text,
            "prompt_token_ids": prompt_ids,
            "token_ids": tokens,
            "finish_reason": finish,
            "drafter": drafter.model_id if k else None,
            "verifier": verifier.model_id,
            "engine": verifier.kind,
            "dtype": verifier.dtype,
            "stats": {
                **stats.as_dict(),
                "tokens_per_second": len(tokens) / stats.total_seconds
                if stats.total_seconds
                else 0.0,
            },
        }
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        print(
            f"[{len(tokens)} tokens, {stats.rounds} rounds, acceptance "
            f"{stats.acceptance:.2f}, {len(tokens) / max(stats.total_seconds, 1e-9):.2f} "
            f"tokens/s, finish {finish}]",
            file=sys.stderr,
        )
    return 0


def generate_remote(args: argparse.Namespace) -> int:
    import trio

    from p2pspec.core import transcript
    from p2pspec.runtime import logs
    from p2pspec.runtime.client import Client, ClientError

    config = mesh_config(args)
    for flag, (name, default) in LOCAL_ONLY.items():
        if getattr(args, name) != default:
            raise UserError(f"{flag} applies to --local only: the mesh's peers run their models")
    messages = conversation(args)
    logs.configure(level="warning")

    async def run() -> int:
        try:
            with trio.fail_after(args.timeout):
                async with Client(args.bootstrap, config=config) as client:
                    stream = client.stream(
                        "" if messages else args.prompt,
                        messages=messages,
                        max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature,
                        top_k=args.top_k,
                        top_p=args.top_p,
                        seed=args.seed,
                        stop=args.stop,
                        raw=args.raw,
                        draft_tokens=args.draft_tokens,
                        pipelined=args.pipelined,
                    )
                    async with stream as chunks:
                        async for chunk in chunks:
                            if chunk.correction is not None:
                                kept = chunk.correction.keep_text
                                print(
                                    f"\n[correction: {chunk.correction.reason}; the answer "
                                    f"is redone from character {kept}]",
                                    file=sys.stderr,
                                )
                            elif not args.json:
                                sys.stdout.write(chunk.text)
                                sys.stdout.flush()
                    result = chunks.result
                    assert result is not None
        except ClientError as e:
            raise UserError(str(e)) from None
        except trio.TooSlowError:
            raise UserError(f"no answer within --timeout {args.timeout:g} s") from None
        if args.transcript:
            assert result.transcript is not None
            transcript.save(result.transcript, args.transcript)
        if args.json:
            print(json.dumps(result.as_dict()))
        else:
            sys.stdout.write("\n")
            s = result.stats
            print(
                f"[{len(result.token_ids)} tokens, {s['rounds']} rounds, drafter "
                f"{result.drafter_peer_id[-8:]}, verifier {result.verifier_peer_id[-8:]}, "
                f"finish {result.finish_reason}]",
                file=sys.stderr,
            )
        return 0

    return trio.run(run)
