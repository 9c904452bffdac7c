"""`ownllm bench --plot`: aggregate tokens/s, and TTFT and ITL (p50, p99), against concurrency, from a bench report.
Needs matplotlib (`pip install 'ownllm[plot]'`)."""

from __future__ import annotations

from pathlib import Path

from ownllm.plotting import pyplot


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    levels = report["levels"]
    xs = [row["concurrency"] for row in levels]
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    throughput.plot(xs, [row["output_tokens_per_s"] for row in levels], marker="o")
    throughput.set_ylabel("output tokens/s (all streams)")
    for name, style in (("ttft", "-"), ("itl", "--")):
        for q in ("p50", "p99"):
            latency.plot(xs, [row[f"{name}_{q}_s"] * 1000 for row in levels], marker="o", linestyle=style,
                         label=f"{name.upper()} {q}")
    latency.set_yscale("log")
    latency.set_ylabel("milliseconds")
    latency.legend()
    for axes in (throughput, latency):
        axes.set_xscale("log", base=2)
        axes.set_xticks(xs, [str(x) for x in xs])
        axes.set_xlabel("concurrent streams")
        axes.grid(alpha=0.3)
    settings = report["settings"]
    figure.suptitle(f"{report['model']['name']} ({report['model']['quantization']}) on {report['machine']['cpu']}: "
                    f"{settings['prompt_tokens']}-token prompts, {settings['new_tokens']} new tokens", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
