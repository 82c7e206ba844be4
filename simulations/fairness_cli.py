"""`fedtrust fairness ...`: fairness audits of trained classifiers, and the distillation demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from .cli_common import ConfigOpt, SetOpt, console, fail, one_line_errors
from .distill import run_distill
from .fairness_report import write_report
from .fairness_runs import run_bias_demo, run_sensitivity

app = typer.Typer(
    add_completion=False,
    help="Fairness audits: prediction sensitivity and counterfactual gaps (EEC, gender).",
)

ThreadsOpt = Annotated[
    int, typer.Option(help="torch CPU threads (1 is fastest for small models on shared cores)")
]


def _threads(threads: int) -> None:
    if threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


@app.command()
def sensitivity(
    model: Annotated[Path, typer.Option(help="fedtrust run folder (with model/) or model folder")],
    psm: Annotated[
        Path | None,
        typer.Option(help="protected-status model folder (default: train one on EEC gender)"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="report folder (default MODEL/sensitivity)")
    ] = None,
    examples: Annotated[int, typer.Option(help="EEC sentences to measure")] = 200,
    psm_steps: Annotated[int, typer.Option(help="training steps of a new PSM")] = 150,
    batch_size: Annotated[int, typer.Option(help="sentences per gradient batch")] = 32,
    seed: Annotated[int, typer.Option(help="sampling and PSM-training seed")] = 0,
    threads: ThreadsOpt = 1,
) -> None:
    """Accumulated prediction sensitivity + counterfactual gap of a classifier on the EEC."""
    _threads(threads)
    if examples < 1:
        fail(f"--examples must be at least 1, got {examples}")
    with one_line_errors():
        result, out_dir = run_sensitivity(
            model, psm, out, examples, psm_steps, batch_size, seed, log=console.print
        )
    s, cf = result["sensitivity"], result["counterfactual"]
    by_gender = ", ".join(f"{g} {v:.4g}" for g, v in s["groups"]["gender"].items())
    console.print(
        f"[bold green]done[/]: APS = {s['overall']:.4g} ({by_gender}); counterfactual mean "
        f"|Δp| = {cf['mean_abs_delta']:.4g}, flip rate {cf['flip_rate']:.3f}; report in "
        f"[bold]{out_dir}[/] (sensitivity.md, sensitivity.json, sensitivity.png)"
    )


@app.command("bias-demo")
def bias_demo(
    out: Annotated[Path, typer.Option(help="report folder")] = Path("runs/bias-demo"),
    model: Annotated[str, typer.Option(help="encoder: minilm or a model folder")] = "minilm",
    correlation: Annotated[float, typer.Option(help="P(female | joy) in the biased set")] = 0.9,
    steps: Annotated[int, typer.Option(help="training steps of each classifier")] = 80,
    psm_steps: Annotated[int, typer.Option(help="training steps of the PSM")] = 40,
    freeze_layers: Annotated[int, typer.Option(help="lowest encoder layers kept frozen")] = 5,
    seed: Annotated[int, typer.Option(help="data split and training seed")] = 0,
    threads: ThreadsOpt = 1,
) -> None:
    """Biased vs counterfactually augmented training on the EEC: the biased one scores worse."""
    _threads(threads)
    with one_line_errors():
        result = run_bias_demo(
            model,
            correlation,
            steps,
            psm_steps,
            freeze_layers=freeze_layers,
            seed=seed,
            log=console.print,
        )
        write_report(out, result, f"Bias demo: joy vs not, P(female | joy) = {correlation}")
    for m in result["models"]:
        cf = m["counterfactual"]
        console.print(
            f"{m['name']:>9}: accuracy {m['accuracy']:.3f}, APS {m['sensitivity']['overall']:.4g}"
            f", counterfactual mean |Δp| {cf['mean_abs_delta']:.4g}, flips {cf['flip_rate']:.3f}"
        )
    console.print(f"[bold green]done[/] in {result['seconds']:.0f} s; report in [bold]{out}[/]")


@app.command()
def distill(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Counterfactual role-reversal distillation: teacher vs plain / CDA / CDA+perturbation."""
    with one_line_errors():
        out_dir, _ = run_distill(config, set_ or [], console)
    console.print((out_dir / "distill.md").read_text())
    console.print(f"report in [bold]{out_dir}[/] (distill.md, distill.json, distill.png)")
