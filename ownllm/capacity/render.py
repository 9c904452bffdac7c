"""The terminal view of `ownllm bench` and `ownllm plan`: rich tables and sentences over a bench report or a Plan."""

from __future__ import annotations

from rich.table import Table

from ownllm.capacity.plan import Level, Plan


def duration(seconds: float) -> str:
    """0.0123 -> '12.3ms', 0.25 -> '250ms', 2.5 -> '2.50s'."""
    if seconds >= 1:
        return f"{seconds:.2f}s"
    return f"{seconds * 1000:.1f}ms" if seconds < 0.01 else f"{seconds * 1000:.0f}ms"


def bench_summary(report: dict) -> str:
    single = report["batch1"]
    return (f"{report['model']['name']} ({report['model']['quantization']}, {report['model']['dtype']}) on "
            f"{report['machine']['cpu']}: load {report['load_s']:.2f}s; batch 1: prefill "
            f"{single['prefill_tokens_per_s']:.1f} tokens/s, decode {single['decode_tokens_per_s']:.1f} tokens/s")


def bench_table(report: dict) -> Table:
    table = Table("concurrent streams", "tokens/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                  title=f"{report['settings']['prompt_tokens']}-token prompts, {report['settings']['new_tokens']} new "
                  "tokens each")
    for row in report["levels"]:
        table.add_row(str(row["concurrency"]), f"{row['output_tokens_per_s']:.1f}",
                      *(duration(row[key]) for key in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")))
    return table


def targets(plan: Plan) -> str:
    p = plan.percentile
    return f"TTFT {p} <= {duration(plan.ttft_target_s)} and ITL {p} <= {duration(plan.itl_target_s)}"


def levels_table(plan: Plan) -> Table:
    p = plan.percentile
    table = Table("concurrent streams", "tokens/s", f"TTFT {p}", f"ITL {p}", "within targets")
    for level in plan.levels:
        table.add_row(str(level.concurrency), f"{level.tokens_per_s:.1f}", duration(level.ttft_s),
                      duration(level.itl_s), "yes" if plan.meets(level) else "no")
    return table


def plan_table(plan: Plan) -> Table:
    chosen = plan.chosen
    table = Table("", "", title=f"Within {targets(plan)}", show_header=False)
    table.add_row("concurrent users per machine", str(chosen.concurrency))
    table.add_row("tokens per second", f"{chosen.tokens_per_s:,.1f}")
    table.add_row("tokens per day", f"{plan.tokens_per_day:,.0f}")
    if plan.cost_per_million_tokens is not None:
        table.add_row(f"cost per million tokens at ${plan.price_per_hour:.2f}/hour",
                      f"${plan.cost_per_million_tokens:,.3f}")
    if plan.replicas is not None:
        table.add_row(f"machines for {plan.users:,} users", str(plan.replicas))
    return table


def cannot_meet(plan: Plan) -> str:
    best: Level = plan.closest
    p = plan.percentile
    measured = ", ".join(str(level.concurrency) for level in plan.levels)
    return (f"This machine cannot meet {targets(plan)} at any measured concurrency ({measured}). The best it reaches: "
            f"TTFT {p} {duration(best.ttft_s)} and ITL {p} {duration(best.itl_s)} at {best.concurrency} concurrent "
            f"stream{'s' * (best.concurrency != 1)}.")
