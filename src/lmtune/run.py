"""The training sequence, the one place that combines data, task, method and training: set up, fit, measure, save."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmtune import models
from lmtune.config import RunConfig, load_config
from lmtune.split_names import eval_split_names
from lmtune.errors import ConfigError
from lmtune.preflight import check_setup
from lmtune.registry import METHODS
from lmtune.rundir import config_stem, open_run, save_outputs
from lmtune.session import Session, count_params, make_accelerator
from lmtune.timing import Phases, record_phases


@dataclass
class RunResult:
    """What a finished run produced: its directory and the contents of its metrics.json."""

    run_dir: Path
    metrics: dict[str, Any]
    phases: Any = None  # timing.Phases: where the process's time went (the command line adds its summary's)


def train(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, *, resume: bool = False,
          callbacks: list[Callable] | None = None, stem: str | None = None) -> RunResult:
    """Fine-tune as configured (one seed: `lmtune.train` hands several to `studies.seeds`) and write a run directory;
    returns its path and final metrics. Ctrl-C raises `RunInterrupted` saying how to continue."""
    from lmtune.training.checkpoint import read_loop_state
    from lmtune.training.guard import diverged, weights_finite
    from lmtune.training.loop import fit
    from lmtune.training.trackers import tracking

    phases = Phases()
    cfg = config if isinstance(config, RunConfig) and not overrides else load_config(config, overrides)
    if cfg.train.seeds:
        raise ConfigError("train.seeds: several seeds train through lmtune.train or `lmtune train` (one run each)")
    if not resume:  # Hub names recorded at the commits they name now (a resumed run keeps its own: open_run)
        cfg = models.pin(cfg)
    setup = check_setup(cfg)  # what validate checks beyond the config file, before anything is written
    accelerator = make_accelerator(cfg.train.precision)
    with open_run(cfg, stem or config_stem(config), resume, accelerator) as (run_dir, cfg, ready):
        phases.lap("config and preflight")
        run = _set_up(cfg, setup, accelerator, run_dir, callbacks, phases)
        ready()  # an earlier run that output.overwrite replaces goes only now: the data and model have loaded
        # Trackers open once data and model are ready: a run that stopped before training leaves only its config.
        with tracking(cfg, run_dir, accelerator, resume) as run.job.trackers:
            phases.lap("trackers")
            started = time.perf_counter()
            spent = _inside_training(read_loop_state(run_dir / "checkpoints" / "last").stages) if resume else {}
            try:
                state = fit(run.job, cfg.train, accelerator, resume=resume)
            finally:
                run.task.release_model()
            phases.lap("training")  # this process's share: a resumed run's earlier evaluations were not in it
            phases.split("training", {k: v - spent.get(k, 0.0) for k, v in _inside_training(state.stages).items()})
            session = run.session
            session.model = run.job.model  # the trained (best, averaged) weights
            metrics, mistakes = _measure(cfg, run, state, started)
            phases.lap("final evaluation")
            if not weights_finite(list(session.model.parameters()), accelerator):  # never saved as the model
                raise diverged(run_dir, state.step, "the final weights hold values that are not finite (NaN/inf)")
            if accelerator.is_main_process:
                save_outputs(run_dir, session.model, session.tokenizer, run.task, metrics, cfg, mistakes, phases)
            run.job.trackers.finish(metrics)  # final metrics; config, metrics.json, plots, model card as files
        accelerator.wait_for_everyone()
        phases.lap("trackers")
        if accelerator.is_main_process:
            record_phases(run_dir, metrics, phases)
        return RunResult(run_dir, metrics, phases)


def _inside_training(stages: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Seconds of evaluations and checkpoints during training, all stages together (carved out of its phase)."""
    return {part: sum(info.get(f"{key}_seconds", 0.0) for info in stages.values())
            for part, key in (("evaluation", "eval"), ("checkpoints", "checkpoint"))}


@dataclass
class _Run:
    """A run set up to train: its session (task, tokenizer, model), encoded splits, the loop's job, and what is
    measured before training to compare with after."""

    session: Session
    task: Any
    splits: dict[str, Any]
    features: dict[str, Any]
    job: Any
    data_report: dict[str, Any]
    probe: Callable[[], dict[str, Any]] | None
    before: dict[str, Any] | None


def _set_up(cfg: RunConfig, setup: Any, accelerator: Any, run_dir: Path, callbacks: list[Callable] | None,
            phases: Phases) -> _Run:
    """Read and encode the data, load the model, apply the method: the loop's job."""
    import transformers

    from lmtune.evaluation.forgetting import forgetting_probes
    from lmtune.methods import TaskInfo
    from lmtune.training.losses import training_loss
    from lmtune.training.loop import Job

    transformers.set_seed(cfg.train.seed)
    task, tokenizer = setup.task, setup.tokenizer
    with accelerator.main_process_first():  # the main process fills the datasets cache, the rest read it
        splits, data_report = task.load_splits(cfg.train.seed)
        phases.lap("data read and checks")
        method = METHODS[cfg.method.name]
        model, new_weights = models.load_model(task.auto_class, cfg.model, **task.model_kwargs(),
                                               **method.load_kwargs(cfg.method, accelerator.device))
        task.shape_model(model, checkpoint=models.resolve_model(cfg.model.name, cfg.model.allow_pickle,
                                                                cfg.model.trust_remote_code))
        session = Session(cfg, task, tokenizer, model, accelerator)
        phases.lap("model load")
        features = {name: session.encode(ds) for name, ds in splits.items()}
        phases.lap("tokenization")
    data_report.update(task.encode_report)
    if isinstance(cfg.data.test, dict):  # named test sets: their split keys and names
        data_report["test_sets"] = {key: name for key, name, _, _ in cfg.data.test_sets()}
    generate_test = task.generates_on_test and "test" in splits and cfg.eval.test
    if cfg.eval.general_text or cfg.eval.general_chat or cfg.eval.reference_probe or generate_test:
        model.to(accelerator.device)  # measured before training: where it will train
    probe = forgetting_probes(cfg.eval, session, cfg.train.seed)
    before = session.score_generations(splits["test"]) if generate_test else None
    phases.lap("probes before training")
    info = TaskInfo(head_names=models.head_names(model, new_weights), epochs=cfg.train.epochs,
                    new_names=list(new_weights), target_ids=_target_ids(features.get("train")))
    if cfg.train.gradient_checkpointing:
        models.checkpoint_activations(model)
    model = session.model = method.prepare(model, info, cfg.method)  # peft methods wrap the model
    task.prepare_model(model)  # e.g. the causal-LM tasks' memory-lean loss, on the wrapped model
    metric = cfg.eval.metric or task.default_metric
    validation = features.get("validation")
    job = Job(model=model, stages=method.apply(model, info, cfg.method), train_set=features["train"],
              collate=session.collate, metric=metric, greater_is_better=task.greater_is_better(metric),
              evaluate=(lambda m: session.evaluate(validation, m)[0]) if validation is not None and len(validation)
              else None, run_dir=run_dir, callbacks=list(callbacks or []), loss=training_loss(cfg.train, task),
              count_targets=task.count_targets, width=session.width,
              sample_weights=task.sample_weights(features["train"]) if cfg.data.sampler == "balanced" else None)
    _hold_frozen(model, job.trained, accelerator)
    phases.lap("method")
    return _Run(session, task, splits, features, job, data_report, probe, before)


def _target_ids(train: Any, rows: int = 256) -> list[int]:
    """Token ids among the targets of the first `rows` training rows of a token-level task (labels where the rows
    carry per-token labels, else the input ids a causal LM predicts); empty otherwise."""
    if train is None or not len(train) or "input_ids" not in train.column_names:
        return []
    sample = train.select(range(min(rows, len(train))))
    labels = sample["labels"] if "labels" in sample.column_names else None
    if labels is not None and not (len(labels) and isinstance(labels[0], list)):
        return []  # one label a row: classes, not tokens
    return sorted({int(t) for row in (labels if labels is not None else sample["input_ids"]) for t in row if t >= 0})


def _hold_frozen(model: Any, trained: set[str], accelerator: Any) -> None:
    """An adapter's backbone never trains: its linear layers in the autocast precision (not under sharding: FSDP's
    flat parameters need one dtype a block)."""
    if (not models.is_adapter(model) or accelerator.mixed_precision not in ("bf16", "fp16")
            or accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")):
        return
    import torch

    from lmtune.training.frozen import hold_frozen_linear

    freed = hold_frozen_linear(model, torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16,
                               trained)
    logging.getLogger(__name__).info("frozen linear layers held in %s: %.2f GB less", accelerator.mixed_precision,
                                      freed / 1e9)


def _measure(cfg: RunConfig, run: _Run, state: Any, started: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics.json (the final model on validation and test, the probes again, time, throughput and size) and the
    worst mistakes on each split (mistakes.json)."""
    from lmtune.evaluation.overfitting import diagnose_run

    session, job = run.session, run.job
    overfitting = diagnose_run(job.run_dir, cfg.train, job.metric, run.task) if job.evaluate is not None else None
    results: dict[str, Any] = {}
    mistakes: dict[str, Any] = {}
    if (tuned := run.task.tune(session, run.features.get("validation"))) is not None:  # e.g. per-label thresholds
        results["tuned"] = tuned
    if cfg.eval.calibrate:  # the temperature first: every figure below is of the calibrated model
        from lmtune.evaluation.calibration import temperature_scaling

        shown = {k: run.features[k] for k in eval_split_names(run.features) if len(run.features[k])}
        results["calibration"] = temperature_scaling(session, shown)
        models.base_model_config(session.model).lmtune_temperature = results["calibration"]["temperature"]
    for name in eval_split_names(run.features):  # validation, the test set, any other named test sets
        if len(run.features[name]) and (name == "validation" or cfg.eval.test):
            scalars, details = session.evaluate(run.features[name], examples=run.splits[name])
            if "mistakes" in details:
                mistakes[name] = details.pop("mistakes")
            results[name] = {**scalars, **details}
    if run.before is not None:
        results["test"]["generation"] = session.score_generations(run.splits["test"])
        results["test"]["generation_before_training"] = run.before
    if run.probe is not None:
        results["forgetting"] = run.probe()
    trainable, total = count_params(session.model, {n for s in job.stages for n in s.trainable})
    seconds = sum(state.stage_seconds.values())
    return {
        "run": job.run_dir.name, "task": cfg.task.name, "method": cfg.method.name, "model": cfg.model.name,
        "selection": {"metric": job.metric, "greater_is_better": job.greater_is_better, "best": state.best_metric,
                      "best_step": state.best_step},
        **results,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_seconds": round(seconds, 2),
        "wall_seconds_after_resume": round(time.perf_counter() - started, 2),
        "stage_seconds": {k: round(v, 2) for k, v in state.stage_seconds.items()},
        "stages": state.stages,
        "train_examples_per_second": round(state.examples / seconds, 2) if seconds else None,
        "train_tokens_per_second": round(state.tokens / seconds, 1) if seconds else None,
        "params": {"trainable": trainable, "total": total},
        "data": run.data_report,
        **({"overfitting": overfitting} if overfitting else {}),
    }, mistakes
