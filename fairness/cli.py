"""`fedtrust fairness ...`: fairness audits of trained classifiers."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    add_completion=False,
    help="Fairness audits: prediction sensitivity and counterfactual gaps (EEC, gender).",
)
console = Console(soft_wrap=True)  # one line per message, however long its paths

REQUIRED_GROUPS = {"gender": ["male", "female"], "race": ["African-American", "European"]}
ThreadsOpt = Annotated[
    int, typer.Option(help="torch CPU threads (1 is fastest for small models on shared cores)")
]


def _threads(threads: int) -> None:
    import torch

    if threads < 1:
        _fail(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def load_classifier(folder: Path) -> tuple[Any, Any, Path]:
    """(model, tokenizer, model folder) from a fedtrust run folder (with model/) or a plain
    transformers folder; ValueError with one clear line when it is neither or no classifier."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from fedtrust.tasks.models import quiet_transformers, resolve_model

    quiet_transformers()
    if not folder.exists():
        raise ValueError(f"{folder}: no such folder")
    if (folder / "model" / "config.json").is_file():
        model_dir = folder / "model"
    elif (folder / "config.json").is_file():
        model_dir = folder
    else:
        raise ValueError(
            f"{folder}: no model (expected model/config.json of a fedtrust run folder, or "
            "config.json of a transformers model folder)"
        )
    config = AutoConfig.from_pretrained(model_dir)
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        kind = ", ".join(architectures) or f"{config.model_type} model without a classifier head"
        raise ValueError(f"{model_dir} is a {kind}, not a sequence classifier")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        run_config = model_dir.parent / "config.toml"
        if model_dir == folder or not run_config.is_file():
            raise ValueError(f"{model_dir}: no tokenizer saved with the model ({err})") from err
        name = tomllib.loads(run_config.read_text()).get("task", {}).get("model", "minilm")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    return model, tokenizer, model_dir


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
    import numpy as np
    import torch

    from .eec import EECError, counterparts, load_eec
    from .psm import accuracy, gender_data, train_psm
    from .report import write_report
    from .sensitivity import SensitivityError, audit, check_compatible

    _threads(threads)
    try:
        if examples < 1:
            raise ValueError(f"--examples must be at least 1, got {examples}")
        tc, tokenizer, model_dir = load_classifier(model)
        out_dir = out or model / "sensitivity"
        rows = load_eec()
        mates = counterparts(rows)
        order = np.random.default_rng(seed).permutation(len(rows))
        chosen = [int(i) for i in order if mates[i] is not None][:examples]
        taken = set(chosen)
        psm_info: dict[str, Any] = {}
        if psm is not None:
            psm_model, psm_tokenizer, psm_dir = load_classifier(psm)
            check_compatible(tc, psm_model, tokenizer, psm_tokenizer, str(model_dir), str(psm_dir))
            psm_info["model"] = str(psm_dir)
            psm_info["same_embeddings_as_tc"] = bool(
                torch.equal(
                    tc.get_input_embeddings().weight, psm_model.get_input_embeddings().weight
                )
            )
            if not psm_info["same_embeddings_as_tc"]:
                console.print(
                    "note: the PSM's embedding table differs from the classifier's; both are fed "
                    "the classifier's token embeddings"
                )
        else:
            console.print(f"training a protected-status model on EEC gender ({psm_steps} steps)")
            train_rows = [r for i, r in enumerate(rows) if i not in taken]
            layers = getattr(tc.config, "num_hidden_layers", 2)
            psm_model, psm_info = train_psm(
                tc, tokenizer, *gender_data(train_rows), psm_steps, freeze_layers=max(0, layers - 2)
            )
            psm_model.save_pretrained(out_dir / "psm")
            tokenizer.save_pretrained(out_dir / "psm")
            psm_info["model"] = str(out_dir / "psm")
            console.print(f"saved it to {out_dir / 'psm'} (reuse it with --psm)")
        test = [rows[i] for i in chosen]
        psm_info["gender_accuracy"] = accuracy(psm_model, tokenizer, *gender_data(test))
        console.print(f"measuring {len(test)} EEC sentences")
        result = audit(
            str(model_dir),
            tc,
            psm_model,
            tokenizer,
            [r.sentence for r in test],
            [rows[mates[i]].sentence for i in chosen],
            {"gender": [r.gender for r in test], "race": [r.race for r in test]},
            REQUIRED_GROUPS,
            batch_size=batch_size,
        )
        write_report(out_dir, {"psm": psm_info, "models": [result]}, f"Fairness of {model}")
    except (SensitivityError, EECError, ValueError, OSError) as err:
        _fail(str(err))
        return
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
    from .bias_demo import run_bias_demo
    from .eec import EECError
    from .report import write_report
    from .sensitivity import SensitivityError

    _threads(threads)
    try:
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
    except (SensitivityError, EECError, ValueError, OSError) as err:
        _fail(str(err))
        return
    for m in result["models"]:
        cf = m["counterfactual"]
        console.print(
            f"{m['name']:>9}: accuracy {m['accuracy']:.3f}, APS {m['sensitivity']['overall']:.4g}"
            f", counterfactual mean |Δp| {cf['mean_abs_delta']:.4g}, flips {cf['flip_rate']:.3f}"
        )
    console.print(f"[bold green]done[/] in {result['seconds']:.0f} s; report in [bold]{out}[/]")


@app.command()
def distill(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config (default: the demo)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override: section.key=value")
    ] = None,
) -> None:
    """Counterfactual role-reversal distillation: teacher vs plain / CDA / CDA+perturbation."""
    from fedtrust.fairness.distill import run_distill
    from fedtrust.simulations.config import ConfigError

    try:
        out_dir, _ = run_distill(config, set_ or [])
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
        return
    console.print((out_dir / "distill.md").read_text())
    console.print(f"report in [bold]{out_dir}[/] (distill.md, distill.json, distill.png)")
