"""The eval's plot: accuracy vs samples per strategy with 95% intervals, beside greedy. Needs matplotlib
(`pip install ownllm[plot]`)."""

from __future__ import annotations

from pathlib import Path

from ownllm.plotting import pyplot


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    results = report["results"]
    figure, axes = plt.subplots(figsize=(6, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in results if r["strategy"] != "greedy"):
        rows = sorted((r for r in results if r["strategy"] == strategy), key=lambda r: r["samples"])
        xs = [r["samples"] for r in rows]
        ys = [r["accuracy"] for r in rows]
        errors = [[r["accuracy"] - r["ci_low"] for r in rows], [r["ci_high"] - r["accuracy"] for r in rows]]
        axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=strategy)
    for r in results:
        if r["strategy"] == "greedy":
            axes.axhline(r["accuracy"], color="gray", linestyle="--", label="greedy")
            axes.axhspan(r["ci_low"], r["ci_high"], color="gray", alpha=0.15)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("samples")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{report['model']} on {report['family']} ({report['split']}, {report['num_problems']} problems)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
