"""SST-2 side by side, in one run: lmtune (examples/sst2.yaml) and a plain HF Trainer script
(benchmarks/sst2_trainer_baseline.py) on the same model, data and hyperparameters (run_glue.py's: every training row,
lr 2e-5, batch 32, 3 epochs, max length 128, no warmup, no weight decay, no evaluation during training, GLUE dev
accuracy at the end). Prints dev accuracy, train time, real tokens per second and the ratios, and writes them as JSON.

    python benchmarks/sst2_compare.py --model /path/to/minilm --data-dir ../shared/data/sst2 --out sst2.json
    # add --dynamic-padding to also run the Trainer with per-batch padding; smoke test: --max-steps 3

lmtune pads per batch (length-grouped, multiple of 8); the Trainer pads every row to 128 (run_glue's default) or,
with --dynamic-padding, per batch. Each system runs in its own process; lmtune is imported from this checkout's src/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from side_by_side import describe, describe_runs, device, lmtune_runs, run, time_split  # benchmarks/ is on the path: scripts run from there


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder (e.g. an fp16 copy of all-MiniLM-L6-v2)")
    parser.add_argument("--data-dir", required=True, help="folder with train.tsv.gz and dev.tsv")
    parser.add_argument("--dynamic-padding", action="store_true", help="also run the Trainer with per-batch padding")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for MFU (H100 SXM: 989)")
    parser.add_argument("--max-steps", type=int, default=None, help="smoke tests only")
    parser.add_argument("--max-train-samples", type=int, default=None,
                        help="a seeded subset of the training rows (each system draws its own subset of this size)")
    parser.add_argument("--lmtune-runs", type=int, default=1,
                        help="run lmtune this many times (the second one reuses the first's tokenization cache)")
    parser.add_argument("--set", nargs="*", default=[], help="extra lmtune overrides (e.g. train.compile=true)")
    parser.add_argument("--work-dir", default="runs/sst2-compare")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, data, work = str(Path(args.model).resolve()), Path(args.data_dir).resolve(), Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"model.name={model}", f"data.train={data / 'train.tsv.gz'}", f"data.test={data / 'dev.tsv'}",
                 f"data.max_train_samples={args.max_train_samples or 'null'}", "data.validation_size=0", "train.lr=2e-5", "method.head_lr=null",
                 "train.warmup_ratio=0", "train.weight_decay=0", f"train.epochs={args.epochs}", "train.batch_size=32",
                 f"model.max_length={args.max_length}",
                 "train.seed=42", f"output.dir={work}", "output.name=lmtune", "output.overwrite=true", *args.set]
    baseline = ["--model", model, "--data-dir", str(data), "--seed", "42", "--max-length", str(args.max_length),
                "--epochs", str(args.epochs)]
    if args.max_train_samples:
        baseline += ["--max-train-samples", str(args.max_train_samples)]
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
        baseline += ["--max-steps", str(args.max_steps)]

    rows = {}
    wall, runs = lmtune_runs([sys.executable, "-m", "lmtune.cli", "train", "examples/sst2.yaml", *overrides],
                             args.lmtune_runs, work / "lmtune" / "metrics.json")
    ours = json.loads((work / "lmtune" / "metrics.json").read_text())
    rows["lmtune"] = {"accuracy": ours["test"]["accuracy"], "train_seconds": ours["train_seconds"],
                      "real_tokens_per_second": ours["train_tokens_per_second"], "steps": ours["steps"],
                      "wall_seconds": wall, "runs": runs, "time_split": time_split(ours),
                      "peak_memory_mb": max((s.get("peak_memory_mb") or 0 for s in ours["stages"].values()),
                                            default=None) or None}
    variants = [("hf_trainer", [])] + ([("hf_trainer_dynamic", ["--dynamic-padding"])] if args.dynamic_padding else [])
    for name, extra in variants:
        wall = run([sys.executable, "benchmarks/sst2_trainer_baseline.py", *baseline, *extra,
                    "--out", str(work / f"{name}.json")])
        theirs = json.loads((work / f"{name}.json").read_text())
        epochs = theirs["steps"] / max(1, -(-theirs["train_rows"] // theirs["settings"]["batch_size"]))
        rows[name] = {"accuracy": theirs["test"]["accuracy"], "train_seconds": theirs["train_seconds"],
                      "real_tokens_per_second": round(theirs["real_tokens_per_epoch"] * epochs
                                                      / theirs["train_seconds"], 1),
                      "steps": theirs["steps"], "wall_seconds": wall, "peak_memory_mb": theirs["peak_memory_mb"]}
    flops_per_token = 6 * _matmul_params(model)  # forward + backward, weights only (attention scores left out)
    for r in rows.values():
        r["mfu"] = round(flops_per_token * r["real_tokens_per_second"] / (args.peak_tflops * 1e12), 4)
    result = {"date": time.strftime("%Y-%m-%d"), "device": device(), "model": model, "rows": rows,
              "flops_per_real_token": flops_per_token,
              "speed_up": {name: round(r["train_seconds"] / rows["lmtune"]["train_seconds"], 2)
                           for name, r in rows.items() if name != "lmtune"}}
    print("\n| system | dev accuracy | train s | real tokens/s | MFU (real tokens) | peak MB | steps | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['accuracy']:.4f} | {r['train_seconds']:.1f} | {r['real_tokens_per_second']:.0f} | "
              f"{r['mfu']:.1%} | {r['peak_memory_mb'] or 0:.0f} | {r['steps']} | {r['wall_seconds']:.1f} |")
    print("\n" + describe(rows["lmtune"]["time_split"]))
    print(describe_runs(runs, rows["hf_trainer"]["wall_seconds"]))
    print("lmtune's speed-up in train time: " + ", ".join(f"{v}x vs {k}" for k, v in result["speed_up"].items()))
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")


def _matmul_params(model: str) -> int:
    """Parameters of the model's matrix multiplications: all but embedding tables (looked up, not multiplied)."""
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    embedding = {id(e.weight) for e in m.modules() if isinstance(e, __import__("torch").nn.Embedding)}
    return sum(p.numel() for p in m.parameters() if id(p) not in embedding)


if __name__ == "__main__":
    main()
