"""Plots and the markdown table of the WAN benchmark (p2pspec/tools/bench_wan.py).

    python -m p2pspec.tools.bench_wan_plot docs/bench/wan-tiny.json docs/bench/wan-qwen.json

redraws each PNG beside its JSON and rewrites the table in docs/benchmarks.md between
the wan-table markers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from p2pspec.tools.report import write_table

GAP_LIMIT = 0.20  # a measured speed this far from the prediction is called out


def best_synchronous(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The fixed draft length that was fastest at this RTT."""
    k, best = max(row["synchronous"].items(), key=lambda kv: kv[1]["tokens_per_second"])
    return k, best


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["by_rtt"]
    rtts = [r["rtt_ms_measured_median"] for r in rows]
    panels = 2 if report.get("scaling") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.4), squeeze=False)
    ax = axes[0][0]
    ax.plot(
        rtts, [r["cloud_only"]["tokens_per_second"] for r in rows], "k-o", label="(a) cloud only"
    )
    best = [best_synchronous(r) for r in rows]
    ax.plot(
        rtts, [b["tokens_per_second"] for _, b in best], "C0-s", label="(b) synchronous, best k"
    )
    four = [r["synchronous"].get("4") for r in rows]
    if all(four):
        ax.plot(rtts, [f["tokens_per_second"] for f in four], "C0:", label="(b) synchronous, k = 4")
    pipe = [r["pipelined_adaptive"] for r in rows]
    ax.plot(rtts, [p["tokens_per_second"] for p in pipe], "C3-^", label="(c) pipelined adaptive")
    ax.plot(rtts, [p["predicted_tokens_per_second"] for p in pipe], "C3--", alpha=0.5,
            label="(c) predicted")  # fmt: skip
    ax.plot(rtts, [b["predicted_tokens_per_second"] for _, b in best], "C0--", alpha=0.5,
            label="(b) predicted")  # fmt: skip
    assisted = report["transformers_assisted_rtt0"]["tokens_per_second"]
    ax.plot([0], [assisted], "C2D", markersize=9, label="(d) transformers assisted, in process")
    ax.set_xlabel("measured round trip to the verifier, ms")
    ax.set_title(f"{report['verifier']} verified, {report['drafter']} drafting", fontsize=9)
    lows, highs = ax.get_ylim()
    if highs > 10 * max(lows, 1e-9):  # a wide range: the lower curves need a log scale
        ax.set_yscale("log")
        ax.set_ylabel("tokens / s (one session, log scale)")
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel("tokens / s (one session)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        points = report["scaling"]
        n = [p["sessions"] for p in points]
        ax.plot(n, [p["per_session_tokens_per_second_median"] for p in points], "C3-^",
                label="per session (median)")  # fmt: skip
        ax.plot(n, [p["aggregate_tokens_per_second"] for p in points], "C1-o", label="aggregate")
        row = next(r for r in rows if r["rtt_ms"] == 40)
        ax.axhline(row["cloud_only"]["tokens_per_second"], color="k", ls=":",
                   label="cloud-only speed of one session")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions on one verifier (40 ms RTT)")
        ax.set_ylabel("tokens / s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(run: dict[str, Any]) -> str:
    gap = run["gap"]
    flag = " ⚠" if abs(gap) > GAP_LIMIT else ""
    return f"{run['tokens_per_second']:.1f} ({run['predicted_tokens_per_second']:.1f}){flag}"


def table(report: dict[str, Any]) -> str:
    """One markdown table: a row per RTT, each method's tokens/s (predicted in brackets)."""
    lines = [
        f"**{report['setup']}**: {report['verifier']} verifying, {report['drafter']} "
        f"drafting, {len(report['prompts'])} prompts x {report['max_new_tokens']} tokens, "
        f"greedy, float32; transformers assisted (in process, 2 cores, RTT 0): "
        f"{report['transformers_assisted_rtt0']['tokens_per_second']:.1f} tokens/s",
        "",
        "| RTT ms (measured) | (a) cloud only | (b) sync k = 4 | (b) sync best k | "
        "(c) pipelined adaptive | (c) / best (b) | (c) / k = 4 | branches taken / sent (c) "
        "| α | passes / token (c; k=4) | bytes / token (c) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["by_rtt"]:
        k, best = best_synchronous(row)
        four = row["synchronous"].get("4")
        pipe = row["pipelined_adaptive"]
        lines.append(
            f"| {row['rtt_ms']} ({row['rtt_ms_measured_median']:.1f}) "
            f"| {row['cloud_only']['tokens_per_second']:.1f} "
            f"| {_cell(four) if four else '-'} "
            f"| {_cell(best)}, k = {k} "
            f"| {_cell(pipe)}, k ≈ {pipe['k_mean']:.1f}, in flight ≤ {pipe['max_in_flight']} "
            f"| {pipe['tokens_per_second'] / best['tokens_per_second']:.2f}x "
            f"| {pipe['tokens_per_second'] / four['tokens_per_second']:.2f}x "
            f"| {pipe.get('branches_taken', 0)} / {pipe.get('branch_blocks', 0)} "
            f"| {pipe['alpha']:.2f} "
            f"| {pipe['verifier_passes_per_token']:.2f}; "
            f"{four['verifier_passes_per_token']:.2f} "
            f"| {pipe['request_bytes_per_token']:.0f} |"
            if four
            else f"| {row['rtt_ms']} | - | - | - | - | - | - | - | - | - | - |"
        )
    return "\n".join(lines)


def main() -> None:
    reports = []
    for name in sys.argv[1:]:
        path = Path(name)
        report = json.loads(path.read_text())
        plot(report, path.with_suffix(".png"))
        reports.append(report)
        print(table(report))
    write_table(Path("docs/benchmarks.md"), "wan", "\n\n".join(table(r) for r in reports))


if __name__ == "__main__":
    main()
