"""The eval's plot: accuracy vs samples per strategy with 95% intervals, beside greedy (left), and accuracy vs
sampled tokens per problem (right: where each kind of compute pays). Needs matplotlib (`pip install ownllm[plot]`)."""

from __future__ import annotations

from pathlib import Path

from ownllm.plotting import pyplot


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    results = report["results"]
    figure, (by_samples, by_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in results if r["strategy"] != "greedy"):
        rows = sorted((r for r in results if r["strategy"] == strategy), key=lambda r: r["samples"])
        ys = [r["accuracy"] for r in rows]
        errors = [[r["accuracy"] - r["ci_low"] for r in rows], [r["ci_high"] - r["accuracy"] for r in rows]]
        line = by_samples.errorbar([r["samples"] for r in rows], ys, yerr=errors, marker="o", capsize=3,
                                   label=strategy)
        by_tokens.plot([r["tokens_per_problem"] for r in rows], ys, marker="o", color=line[0].get_color(),
                       label=strategy)
    for r in results:
        if r["strategy"] == "greedy":
            by_samples.axhline(r["accuracy"], color="gray", linestyle="--", label="greedy")
            by_samples.axhspan(r["ci_low"], r["ci_high"], color="gray", alpha=0.15)
            by_tokens.plot([r["tokens_per_problem"]], [r["accuracy"]], marker="s", color="gray", linestyle="",
                           label="greedy")
    by_samples.set_xscale("log", base=2)
    by_samples.set_xlabel("samples")
    by_samples.set_ylabel("accuracy")
    by_samples.legend(fontsize=8)
    by_tokens.set_xlabel("sampled tokens per problem")
    by_tokens.set_ylabel("accuracy")
    figure.suptitle(f"{report['model']} on {report['family']} ({report['split']}, {report['num_problems']} problems)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
