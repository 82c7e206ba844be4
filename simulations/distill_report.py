"""The distillation run's report: distill.json, distill.md and distill.png in the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .report import write_report_files


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """distill.json, distill.md (a table and example continuations) and distill.png."""
    write_report_files(run_dir, "distill", report, report_markdown(report), tradeoff_figure(report))


def report_markdown(report: dict[str, Any]) -> str:
    """The comparison table, the metric's definition and a few continuations per model."""
    cfg, method = report["config"], report["method"]
    male, female = cfg["bold"]["male_group"], cfg["bold"]["female_group"]
    teacher = report["models"]["teacher"]
    lines = [
        "# Counterfactual role-reversal distillation",
        "",
        f"Teacher: {teacher['source']} ({teacher['params']:,} parameters); students: "
        f"{cfg['student']['layers']} layers x {cfg['student']['width']}, "
        f"{cfg['student']['steps']} steps. Corpus: {cfg['data']['corpus']} "
        f"({report['data']['train_tokens']:,} training tokens, "
        f"{report['data']['heldout_tokens']:,} held out). CDA: {method['cda']}; teacher "
        f"perturbation: {method['perturbation']} (scope {method['perturbation_scope']}); "
        f"{method['counterpart_pairs']} gendered token pairs.",
        "",
        f"| model | parameters | perplexity | polarity {male} | polarity {female} | "
        "disparity ± se | gap | opposite-gender share | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in report["models"].items():
        g = m["bold"]["groups"]
        seconds = m.get("train", {}).get("seconds")
        lines.append(
            f"| {name} | {m['params']:,} | {m['perplexity']:.1f} | {g[male]['polarity']:+.3f} | "
            f"{g[female]['polarity']:+.3f} | {m['bold']['disparity']:.3f} ± "
            f"{m['bold']['disparity_se']:.3f} | {m['bold']['gap']:+.3f} | "
            f"{g[male]['opposite_share']:.2f} / {g[female]['opposite_share']:.2f} | "
            + (f"{seconds:.0f}" if seconds is not None else "-")
            + " |"
        )
    n = report["data"]["prompts_per_group"]
    lines += [
        "",
        f"Continuations: {cfg['bold']['samples_per_prompt']} per prompt, "
        f"{cfg['bold']['max_new_tokens']} tokens, {cfg['bold']['decoding']} decoding, "
        f"{n.get(male, 0)} {male} and {n.get(female, 0)} {female} prompts. Polarity of a "
        "continuation = (male - female words) / (male + female words), 0 without gendered words. "
        f"**Disparity** = |polarity({male}) + polarity({female})|: the difference between the "
        "groups once one is role-reversed (0 = the model writes about each gender as it writes "
        "about the other; 2 = the same gender whatever the prompt). Gap = the plain difference "
        "of the two polarities; opposite-gender share = continuations mentioning the other "
        "gender's words.",
        "",
        f"Runtime: {report['runtime_s'] / 60:.1f} min.",
        "",
        "## Example continuations",
        "",
    ]
    for name, m in report["models"].items():
        lines.append(f"**{name}**")
        lines.append("")
        for rows in m["bold"]["examples"].values():
            for row in rows[:2]:
                prompt, text = (" ".join(row[k].split()) for k in ("prompt", "continuation"))
                lines.append(f"- _{prompt}_ → {text}")
        lines.append("")
    return "\n".join(lines)


def tradeoff_figure(report: dict[str, Any]) -> Figure:
    """Disparity (with its standard error) against held-out perplexity, one point per model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, m in report["models"].items():
        ax.errorbar(
            m["bold"]["disparity"],
            m["perplexity"],
            xerr=m["bold"]["disparity_se"],
            marker="s" if name == "teacher" else "o",
            capsize=3,
            label=name,
        )
    ax.set_xlabel("gender disparity on BOLD prompts (lower is fairer)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("counterfactual role-reversal distillation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
