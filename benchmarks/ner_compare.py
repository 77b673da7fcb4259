"""CoNLL-2003 NER side by side, in one run: lmtune (examples/conll2003.yaml) and a plain HF Trainer script
(benchmarks/ner_trainer_baseline.py) on the same model, data and hyperparameters (run_ner.py's: lr 5e-5, batch 8,
3 epochs, max length 128, no warmup, no weight decay, best epoch by F1 on eng.testa). Prints both F1s on eng.testb
and both train times, and writes them as JSON.

    python benchmarks/ner_compare.py --model /path/to/minilm --data-dir ../shared/data/conll2003 --out ner.json
    # smoke test on a CPU: add --max-steps 3 --max-train-samples 64 --max-eval-samples 64

Each system runs in its own process (its own start-up, CUDA context and allocator). lmtune is imported from this
checkout's src/ when it is not installed. Needs torch, transformers, accelerate, datasets, pydantic, seqeval (and
lmtune's light dependencies: pyyaml, typer, rich, scikit-learn, matplotlib).
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
    parser.add_argument("--data-dir", required=True, help="folder with eng.train, eng.testa, eng.testb")
    parser.add_argument("--max-steps", type=int, default=None, help="smoke tests only")
    parser.add_argument("--max-train-samples", type=int, default=None,
                        help="a subset of this many training sentences (lmtune: a seeded random subset; the "
                             "Trainer script: the first ones; also for smoke tests)")
    parser.add_argument("--lmtune-runs", type=int, default=1,
                        help="run lmtune this many times (the second one reuses the first's tokenization cache)")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="smoke tests only")
    parser.add_argument("--seed", type=int, default=42, help="train.seed of lmtune and --seed of the Trainer script")
    parser.add_argument("--work-dir", default="runs/ner-compare", help="run directory and Trainer outputs")
    parser.add_argument("--out", default=None, help="write both results as JSON here")
    args = parser.parse_args()
    model, data, work = str(Path(args.model).resolve()), Path(args.data_dir).resolve(), Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    overrides = [f"model.name={model}", f"data.train={data / 'eng.train'}", f"data.validation={data / 'eng.testa'}",
                 f"data.test={data / 'eng.testb'}", f"output.dir={work}", "output.name=lmtune", "output.overwrite=true",
                 f"train.seed={args.seed}"]
    baseline = ["--model", model, "--data-dir", str(data), "--output-dir", str(work / "trainer"),
                "--out", str(work / "trainer.json"), "--seed", str(args.seed)]
    for key, lmtune_key, flag in (("max_steps", "train.max_steps", "--max-steps"),
                                  ("max_train_samples", "data.max_train_samples", "--max-train-samples"),
                                  ("max_eval_samples", "data.max_eval_samples", "--max-eval-samples")):
        if getattr(args, key):
            overrides.append(f"{lmtune_key}={getattr(args, key)}")
            baseline += [flag, str(getattr(args, key))]

    lmtune_wall, runs = lmtune_runs([sys.executable, "-m", "lmtune.cli", "train", "examples/conll2003.yaml", *overrides],
                                    args.lmtune_runs, work / "lmtune" / "metrics.json")
    trainer_wall = run([sys.executable, "benchmarks/ner_trainer_baseline.py", *baseline])
    ours = json.loads((work / "lmtune" / "metrics.json").read_text())
    theirs = json.loads((work / "trainer.json").read_text())
    rows = {
        "lmtune": {"test_f1": ours["test"]["f1"], "test_precision": ours["test"]["precision"],
                   "test_recall": ours["test"]["recall"], "validation_f1": ours["validation"]["f1"],
                   "train_seconds": ours["train_seconds"], "wall_seconds": lmtune_wall, "runs": runs, "steps": ours["steps"],
                   "best_step": ours["selection"]["best_step"], "test_words_scored": ours["test"]["words"],
                   "time_split": time_split(ours)},
        "hf_trainer": {"test_f1": theirs["test"]["f1"], "test_precision": theirs["test"]["precision"],
                       "test_recall": theirs["test"]["recall"], "validation_f1": theirs["validation"]["f1"],
                       "train_seconds": theirs["train_seconds"], "wall_seconds": trainer_wall, "steps": theirs["steps"],
                       "test_words_not_scored": theirs["words_not_scored_after_truncation"]["testb"]},
    }
    result = {"date": time.strftime("%Y-%m-%d"), "device": device(), "model": model, "seed": args.seed, "rows": rows,
              "f1_difference": round(rows["lmtune"]["test_f1"] - rows["hf_trainer"]["test_f1"], 4),
              "train_time_ratio": round(rows["lmtune"]["train_seconds"] / rows["hf_trainer"]["train_seconds"], 3)}
    print("\n| system | test F1 | test P | test R | validation F1 | train s | wall s | steps |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['test_f1']:.4f} | {r['test_precision']:.4f} | {r['test_recall']:.4f} | "
              f"{r['validation_f1']:.4f} | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} | {r['steps']} |")
    print("\n" + describe(rows["lmtune"]["time_split"]))
    print(describe_runs(runs, trainer_wall))
    print(f"F1 difference (lmtune - trainer): {result['f1_difference']:+.4f}; "
          f"train time ratio (lmtune / trainer): {result['train_time_ratio']:.3f}")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
