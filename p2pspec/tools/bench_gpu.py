"""The GPU check: a CUDA verifier's cost curve and what it makes the mesh worth.

    python -m p2pspec.tools.bench_gpu --out OUT/gpu.json          # where a GPU is lent
    python -m p2pspec.tools.bench_gpu --device cpu --small         # the same path, on a CPU

The question (docs/engines.md): where verifying n tokens costs about what one costs
(memory-bound: GPUs, bf16), drafting pays; where it grows with n (a quantized model on a
CPU core), the mesh decodes alone (k = 0). On the device machine the embedded GGUF files
cannot travel (its tree is limited to 64 MiB), so the models are random ones shaped like
the embedded pair, Qwen2.5-Coder 1.5B (verifier) and 0.5B (drafter): what a forward pass
costs depends on shapes, not on the values of the weights. Measured, through p2pspec's own
transformers engine (engines/hf.py, `--device cuda`, bfloat16):

1. the verifier's cost curve t_verify(n), n = 1..16 (engines/costs.py, what a verifier
   peer measures at start-up and advertises), and its plain decoding speed;
2. the drafter's t_draft, on the device and on one CPU core;
3. the cost model's plan and predicted tokens/s (policy.best_plan, the arithmetic a session
   runs) against plain decoding, at α measured for the real pair on CPUs (0.6 to 0.8) and
   at round trips of 0, 10 and 40 ms.

Not measured there: the mesh itself (its peers need libp2p, whose wheels and their native
dependencies do not travel in the device's 64 MiB) and llama.cpp's GPU offload (the
binding builds from source, with CUDA: longer than a device lease). testnet/gpu-check.sh
is the one command to run on the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

ALPHAS = (0.6, 0.7, 0.8)
RTTS_S = (0.0, 0.010, 0.040)
# Qwen2.5-Coder shapes (config.json of the released models).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    # --small: the same code path in seconds on a CPU.
    "small-verifier": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2),
    "small-drafter": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
VOCAB = 151936


def random_engine(shape: str, *, device: str, dtype: str, threads: int) -> Any:
    """A TransformersEngine over a random Qwen2 model of `shape` on `device`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from p2pspec.engines.hf import TransformersEngine
    from p2pspec.models import ByteTokenizer
    from p2pspec.models.loader import LoadedModel

    torch.set_num_threads(threads)
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.eval()
    model.requires_grad_(False)
    lm = LoadedModel(
        spec=f"random:{shape}", model_id=f"random:{shape}", model=model,
        tokenizer=ByteTokenizer(), dtype=dtype, weights_fingerprint="random",  # type: ignore[arg-type]
        max_context=4096, vocab_size=VOCAB,
    )  # fmt: skip
    return TransformersEngine(lm, threads=threads)


def decode_speed(engine: Any, tokens: int = 64) -> float:
    """Plain greedy decoding's tokens/s after a 64-token prompt (one pass per token)."""
    seq = engine.new_sequence()
    try:
        logits = seq.append([(7 + 31 * i) % 256 for i in range(64)], rows=1)
        start = time.perf_counter()
        for _ in range(tokens):
            token = int(np.argmax(logits[-1])) % 256
            logits = seq.append([token], rows=1)
        return tokens / (time.perf_counter() - start)
    finally:
        seq.close()


def main(argv: list[str] | None = None) -> None:
    import torch

    from p2pspec.core.policy import best_plan
    from p2pspec.engines.costs import measure_cost_curve

    parser = argparse.ArgumentParser(prog="python -m p2pspec.tools.bench_gpu")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--small", action="store_true", help="small shapes (a CPU smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (cpu device)")
    parser.add_argument("--out", default="gpu.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device (use --device cpu for the smoke run)")
    v_shape, d_shape = (
        ("small-verifier", "small-drafter") if args.small else ("qwen2.5-1.5b", "qwen2.5-0.5b")
    )
    verifier = random_engine(v_shape, device=args.device, dtype=args.dtype, threads=args.threads)
    drafter = random_engine(d_shape, device=args.device, dtype=args.dtype, threads=args.threads)
    curve = measure_cost_curve(verifier, repeats=5)
    plain = decode_speed(verifier)
    t_draft = 1.0 / decode_speed(drafter)
    cpu_drafter = random_engine(d_shape, device="cpu", dtype="float32", threads=1)
    t_draft_cpu = 1.0 / decode_speed(cpu_drafter, tokens=16)
    plans = []
    for where, td in (("drafter on the device", t_draft), ("drafter on one CPU core", t_draft_cpu)):
        for alpha in ALPHAS:
            for rtt in RTTS_S:
                plan = best_plan(alpha=alpha, t_draft_s=td, t_verify_s=curve, rtt_s=rtt)
                plans.append({
                    "drafter": where, "alpha": alpha, "rtt_ms": 1000 * rtt, "k": plan.k,
                    "depth": plan.depth, "predicted_tokens_per_s": plan.tokens_per_s,
                    "over_plain": plan.tokens_per_s / plain,
                })  # fmt: skip
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "verifier_shape": v_shape,
        "drafter_shape": d_shape,
        "cost_curve_ms": [round(1000 * c, 3) for c in curve],
        "t_verify_16_over_1": curve[15] / curve[0],
        "plain_tokens_per_s": plain,
        "t_draft_ms": 1000 * t_draft,
        "t_draft_cpu_ms": 1000 * t_draft_cpu,
        "plans": plans,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "plans"}, indent=1))
    for p in plans:
        print(
            f"{p['drafter']:24} α {p['alpha']:.1f} RTT {p['rtt_ms']:3.0f} ms: k {p['k']:2d}, "
            f"depth {p['depth']}, {p['predicted_tokens_per_s']:7.1f} tok/s "
            f"({p['over_plain']:.2f}x plain)"
        )


if __name__ == "__main__":
    main()
