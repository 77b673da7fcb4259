"""lmtune vs a plain HF Trainer QA script (run_qa.py style) on the same article split and hyperparameters.

    python benchmarks/qa_compare.py --model MODEL_DIR --data dev-v1.1.json.gz [--out results.json]

Runs `lmtune.train(examples/squad.yaml)` with the model and data paths given, then
benchmarks/qa_trainer_baseline.py on exactly the articles lmtune trained on and was tested on (read
from lmtune's metrics.json) with lmtune's resolved hyperparameters (lr, batch size, epochs, max length,
doc stride, n-best, max answer length, seed). Each system runs in its own process, one after the other;
prints test EM/F1, training time and wall time for both, and the ratios. Extra lmtune overrides go after
--set (e.g. a smoke test: --set data.max_train_samples=200 data.max_eval_samples=100 train.max_steps=5).
--seeds 42 1 2 repeats the pair per seed; train.seed also seeds the article split, so every seed is a
different split (the same for both systems); seed 42 is the split written down in examples/squad_split.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from side_by_side import describe, describe_runs, lmtune_runs, run, time_split  # noqa: E402 - benchmarks/ is on the path


def run_lmtune(config: str, overrides: list[str], out: Path) -> None:
    """In a child process: train with lmtune and write what the comparison needs."""
    import logging

    from lmtune import timing

    timing.process_started = timing.process_start_time()  # this child's imports count in its phase_seconds
    import lmtune

    logging.basicConfig(level=logging.WARNING)
    result = lmtune.train(config, overrides)
    m = result.metrics
    test = m["test"]
    summary = {"system": "lmtune", "exact_match": round(test["exact_match"], 2), "f1": round(test["f1"], 2),
               "validation_f1": round(m.get("validation", {}).get("f1", float("nan")), 2),
               "test_questions": test["examples"], "test_windows": test["windows"],
               "train_questions": m["data"]["rows"]["train"], "steps": m["steps"],
               "best_step": m["selection"]["best_step"], "train_seconds": m["train_seconds"],
               "time_split": time_split(m),
               "train_tokens_per_second": m["train_tokens_per_second"], "groups": m["data"].get("groups"),
               "phase_seconds": m.get("phase_seconds", {}),
               "run_dir": str(result.run_dir)}
    out.write_text(json.dumps(summary, indent=2), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder (e.g. .carry/minilm-fp16)")
    parser.add_argument("--data", required=True, help="SQuAD v1.1 dev JSON (e.g. .carry/squad_v1.1/dev-v1.1.json.gz)")
    parser.add_argument("--config", default="examples/squad.yaml")
    parser.add_argument("--seeds", nargs="*", type=int, default=[42], help="train.seed values (each its own split)")
    parser.add_argument("--work", default="/tmp/qa_compare", help="folder for run directories and results")
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    parser.add_argument("--set", nargs="*", default=[], help="extra lmtune overrides (section.key=value)")
    parser.add_argument("--lmtune-runs", type=int, default=1,
                        help="run lmtune this many times per seed (the second one reuses the first's tokenization cache)")
    parser.add_argument("--lmtune-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The children run in the checkout's root: paths given relative to where this was started are made absolute.
    args.model, args.data, args.work = (str(Path(p).resolve()) for p in (args.model, args.data, args.work))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.lmtune_child:
        overrides = [f"model.name={args.model}", f"data.train={args.data}", f"output.dir={work}",
                     "output.name=lmtune-squad", "output.overwrite=true", *args.set]
        run_lmtune(args.config, overrides, Path(args.lmtune_child))
        return
    results = [compare(args, seed, work / f"seed{seed}") for seed in args.seeds]
    print_table(results)
    (work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")


def compare(args: argparse.Namespace, seed: int, work: Path) -> dict:
    """One seed: lmtune, then the Trainer baseline on lmtune's train/test articles and hyperparameters."""
    from lmtune.config import load_config

    work.mkdir(parents=True, exist_ok=True)
    extra = [f"train.seed={seed}", *args.set]
    cfg = load_config(ROOT / args.config, [f"model.name={args.model}", f"data.train={args.data}", *extra])
    lmtune_json = work / "lmtune.json"
    lmtune_wall, runs = lmtune_runs([sys.executable, __file__, "--model", args.model, "--data", args.data, "--config",
                                     args.config, "--work", str(work), "--lmtune-child", str(lmtune_json), "--set",
                                     *extra], args.lmtune_runs, lmtune_json)  # the child's summary has phase_seconds
    ours = json.loads(lmtune_json.read_text(encoding="utf-8"))
    ours["wall_seconds"], ours["runs"] = lmtune_wall, runs
    # The baseline trains and tests on the very articles lmtune did (its validation articles stay unused).
    split = work / "split.json"
    split.write_text(json.dumps({"train": ours["groups"]["train"], "test": ours["groups"]["test"]}), encoding="utf-8")
    trainer_json = work / "trainer.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "qa_trainer_baseline.py"), "--model", args.model,
               "--data", args.data, "--split", str(split), "--out", str(trainer_json),
               "--output-dir", str(work / "trainer"), "--lr", str(cfg.train.lr), "--batch-size",
               str(cfg.train.batch_size), "--epochs", str(cfg.train.epochs), "--max-length", str(cfg.model.max_length),
               "--doc-stride", str(cfg.task.doc_stride), "--n-best", str(cfg.task.n_best), "--max-answer-length",
               str(cfg.task.max_answer_length), "--seed", str(seed)]
    if cfg.train.max_steps:
        command += ["--max-steps", str(cfg.train.max_steps)]
    if cfg.data.max_train_samples:  # smoke tests: a subset of the same size (not the same questions)
        command += ["--max-train-samples", str(cfg.data.max_train_samples)]
    if cfg.data.max_eval_samples:
        command += ["--max-eval-samples", str(cfg.data.max_eval_samples)]
    trainer_wall = run(command)
    theirs = json.loads(trainer_json.read_text(encoding="utf-8"))
    theirs["wall_seconds_with_start"] = trainer_wall
    return {"seed": seed, "lmtune": ours, "hf_trainer": theirs,
            "hyperparameters": {"lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
                                "max_length": cfg.model.max_length, "doc_stride": cfg.task.doc_stride,
                                "warmup_ratio": cfg.train.warmup_ratio, "weight_decay": cfg.train.weight_decay}}


def print_table(results: list[dict]) -> None:
    hp = results[0]["hyperparameters"]
    print(f"\nSQuAD v1.1 dev split by article; lr {hp['lr']}, batch {hp['batch_size']}, {hp['epochs']} epochs, "
          f"max length {hp['max_length']}, stride {hp['doc_stride']}, warmup {hp['warmup_ratio']}, "
          f"weight decay {hp['weight_decay']}")
    print("| seed | system | train articles / questions | test articles / questions | test EM | test F1 "
          "| train s | wall s (process) | steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ours, theirs = r["lmtune"], r["hf_trainer"]
        articles = f"{len(ours['groups']['train'])} / {ours['train_questions']}"
        tested = f"{len(ours['groups']['test'])} / {ours['test_questions']}"
        print(f"| {r['seed']} | lmtune | {articles} | {tested} | {ours['exact_match']:.2f} | {ours['f1']:.2f} | "
              f"{ours['train_seconds']:.1f} | {ours['wall_seconds']:.1f} | {ours['steps']} |")
        print(f"| {r['seed']} | HF Trainer (run_qa style) | {theirs['train_questions']} q | "
              f"{theirs['test_questions']} q | {theirs['exact_match']:.2f} | {theirs['f1']:.2f} | "
              f"{theirs['train_seconds']:.1f} | {theirs['wall_seconds_with_start']:.1f} | {theirs['steps']} |")
    mean = {k: sum(r[system][key] for r in results) / len(results)
            for k, system, key in (("em", "lmtune", "exact_match"), ("f1", "lmtune", "f1"),
                                   ("t_em", "hf_trainer", "exact_match"), ("t_f1", "hf_trainer", "f1"),
                                   ("train", "lmtune", "train_seconds"), ("t_train", "hf_trainer", "train_seconds"),
                                   ("wall", "lmtune", "wall_seconds"),
                                   ("t_wall", "hf_trainer", "wall_seconds_with_start"))}
    print(f"mean over {len(results)} seed(s): lmtune - Trainer: EM {mean['em'] - mean['t_em']:+.2f}, "
          f"F1 {mean['f1'] - mean['t_f1']:+.2f}; train time ratio lmtune/Trainer "
          f"{mean['train'] / mean['t_train']:.2f}, wall ratio {mean['wall'] / mean['t_wall']:.2f}")
    print("lmtune's train s includes its per-epoch validation passes and checkpoints; the Trainer's has no "
          "evaluation or saving during training.")
    for r in results:
        print(f"seed {r['seed']}: {describe(r['lmtune']['time_split'])}")
        print(describe_runs(r["lmtune"]["runs"], r["hf_trainer"]["wall_seconds_with_start"]))


if __name__ == "__main__":
    main()
