"""Several seeds of one config: a run per seed under one folder, and mean, std, min, max of every metric."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any, Callable

from lmtune.config import RunConfig
from lmtune.split_names import eval_split_names
from lmtune.training.logs import finite_json

log = logging.getLogger("lmtune")


def parse_seeds(spec: str) -> list[int]:
    """`--seeds 3` -> [1, 2, 3]; `--seeds 1,5,9` -> [1, 5, 9]."""
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()] if "," in spec else list(range(1, int(spec) + 1))
    except ValueError:
        raise ValueError(f"--seeds {spec!r}: give a count (3) or comma-separated seeds (1,5,9)") from None
    if not seeds:
        raise ValueError(f"--seeds {spec!r}: no seeds")
    if len(set(seeds)) != len(seeds):  # one run a seed: a seed twice would train into one folder twice
        raise ValueError(f"--seeds {spec!r}: give distinct seeds")
    return seeds


def describe(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a split's metrics, those one level down too (generation/accuracy, majority_baseline/...)."""
    out = {}
    for key, value in metrics.items():
        inner = {f"{key}/{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
        out.update({name: float(v) for name, v in inner.items() if isinstance(v, (int, float))
                    and not isinstance(v, bool)})
    return out


def summarised(metrics: Any) -> list[str]:
    """The metrics.json sections summarised: validation, each test set, the forgetting probe."""
    return [*eval_split_names(metrics), *(["forgetting"] if "forgetting" in metrics else [])]


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Every scalar metric of validation, test and the forgetting probe (and the training time) described over the
    seeds."""
    out: dict[str, Any] = {"seeds": list(per_seed)}
    for split in summarised(next(iter(per_seed.values()), {})):
        tables = [_scalars(m.get(split, {})) for m in per_seed.values()]
        shared = [k for k in tables[0] if all(k in t for t in tables)] if tables else []
        if shared:
            out[split] = {k: describe([t[k] for t in tables]) for k in shared}
    out["train_seconds"] = describe([m["train_seconds"] for m in per_seed.values()])
    return out


def _markdown(summary: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> str:
    seeds = list(per_seed)
    lines = [f"| split | metric | mean | std | min | max | {' | '.join(f'seed {s}' for s in seeds)} |",
             "|---|---|---|---|---|---|" + "---|" * len(seeds)]
    for split in summarised(summary):
        for key, d in summary.get(split, {}).items():
            values = " | ".join(f"{_scalars(per_seed[s][split])[key]:.4f}" for s in seeds)
            lines.append(f"| {split} | {key} | {d['mean']:.4f} | {d['std']:.4f} | {d['min']:.4f} | "
                         f"{d['max']:.4f} | {values} |")
    return "\n".join(lines) + "\n"


def shared_by_runs(cfg: RunConfig) -> dict[str, Any]:
    """What every run of a study (seeds, compare, search) shares, as dotted overrides: Hub names pinned once, at the
    commits they name now (each run pinning its own could straddle a push), and the study's MLflow store (a run's
    default store is beside it: inside the study's folder)."""
    from lmtune import models

    pinned = models.pin(cfg)
    shared = {"model.name": pinned.model.name,
              **{f"data.{k}": getattr(pinned.data, k) for k in ("train", "validation", "test")
                 if getattr(pinned.data, k) != getattr(cfg.data, k)}}
    if "mlflow" in cfg.output.report_to:
        from lmtune.training.trackers import mlflow_uri

        shared["output.mlflow_uri"] = mlflow_uri(cfg)
    return shared


def apply(raw: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """`raw` (a config dump) with the dotted `shared` settings set."""
    for key, value in shared.items():
        section, field = key.split(".", 1)
        raw[section][field] = value
    return raw


def _parent_dir(cfg: RunConfig, stem: str, resume: bool) -> tuple[Path, Any]:
    """The several-seed run's folder, created (or taken over) and locked for its life: (folder, lock)."""
    from lmtune import folders, rundir

    root = Path(cfg.output.dir)
    if cfg.output.name:
        parent = root / cfg.output.name
    elif resume:
        parent = rundir.find_run(root, stem, lambda p: any(p.glob("seed-*")))
    else:
        parent = rundir.new_folder(root, stem)
    return parent, folders.claim(parent, "seeds", overwrite=cfg.output.overwrite, resume=resume)


def train_seeds(cfg: RunConfig, stem: str, resume: bool = False, callbacks: list[Callable] | None = None) -> Any:
    """Train `cfg` once per seed of `train.seeds` into `<output.dir>/<name>/seed-<s>/`; write seeds.json and
    seeds.md there. Returns a RunResult whose run_dir is that parent folder and whose metrics are the summary
    (`validation`/`test`: metric -> {mean, std, min, max, n}) plus `runs` (seed -> run directory).
    With `resume`, seeds that finished are read back and an unfinished one continues from its checkpoint."""
    parent, lock = _parent_dir(cfg, stem, resume)
    try:
        return _train_seeds(cfg, parent, resume, callbacks)
    finally:
        lock.release()


def _train_seeds(cfg: RunConfig, parent: Path, resume: bool, callbacks: list[Callable] | None) -> Any:
    from lmtune.evaluation.report import write_report
    from lmtune.run import RunResult, train
    from lmtune.training.checkpoint import has_checkpoint
    from lmtune.files import write_text

    from lmtune.config import load_config
    from lmtune.rundir import keep_pins, refuse_changes

    saved = load_config(parent / "config.yaml") if resume and (parent / "config.yaml").is_file() else None
    if saved is not None:  # the seeds go on at the commits they started on
        cfg = keep_pins(cfg, saved)
    shared = shared_by_runs(cfg)
    cfg = load_config(apply(cfg.model_dump(mode="json"), shared))
    if saved is not None:  # seeds trained before are summarised with the rest: all on one config (more may be added)
        refuse_changes(saved, cfg, parent, may_change=("seeds",))
    write_text(parent / "config.yaml", cfg.to_yaml())
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in cfg.train.seeds or []:
        child = parent / f"seed-{seed}"
        raw = cfg.model_dump(mode="json")
        raw["train"].update(seed=seed, seeds=None)
        raw["output"].update(dir=str(parent), name=child.name, overwrite=True)  # the parent was checked above
        if resume and (child / "metrics.json").is_file():
            log.info("seed %d: finished before, read back from %s", seed, child)
            per_seed[seed] = json.loads((child / "metrics.json").read_text(encoding="utf-8"))
            continue
        log.info("seed %d of %s", seed, cfg.train.seeds)
        per_seed[seed] = train(raw, resume=resume and has_checkpoint(child),
                               callbacks=callbacks).metrics
    summary = {**summarise(per_seed), "runs": {str(s): str(parent / f"seed-{s}") for s in per_seed}}
    write_text(parent / "seeds.json", json.dumps(finite_json(summary), indent=2, allow_nan=False))
    table = _markdown(summary, per_seed)
    write_text(parent / "seeds.md", table)
    write_report(parent)
    log.info("%d seeds summarised in %s", len(per_seed), parent / "seeds.md")
    return RunResult(parent, summary)
