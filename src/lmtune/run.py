"""The one place that combines data -> task -> method -> training -> evaluation -> run directory."""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmtune.config import ConfigError, RunConfig, load_config
from lmtune.data.padding import batch_width
from lmtune.preflight import check_setup, precision_problem
from lmtune.registry import METHODS, TASKS

log = logging.getLogger("lmtune")


@dataclass
class RunResult:
    """What a finished run produced: its directory and the contents of its metrics.json."""

    run_dir: Path
    metrics: dict[str, Any]


def _run_dir(cfg: RunConfig, stem: str, resume: bool) -> tuple[Path, Any]:
    """The run's folder, created (or taken over) and locked for the run's life: (folder, lock)."""
    from lmtune import rundir
    from lmtune.training.checkpoint import has_checkpoint

    root = Path(cfg.output.dir)
    if cfg.output.name:
        run_dir = root / cfg.output.name
    elif resume:
        run_dir = rundir.find_run(root, stem, lambda p: has_checkpoint(p, mend=False))
    else:
        run_dir = root / rundir.new_name(stem)
    lock = rundir.claim(run_dir, "run", overwrite=cfg.output.overwrite, resume=resume)
    if resume:
        try:
            _check_resume(cfg, run_dir)
        except BaseException:
            lock.release()
            raise
    return run_dir, lock


def _check_resume(cfg: RunConfig, run_dir: Path) -> None:
    from lmtune.rundir import RESUME_MAY_CHANGE, differences
    from lmtune.training.checkpoint import has_checkpoint, read_loop_state

    last = run_dir / "checkpoints" / "last"
    if not has_checkpoint(run_dir):  # (mended first where a crash fell between the two renames of a save)
        raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from")
    saved = load_config(run_dir / "config.yaml")
    changed = differences(saved.model_dump(exclude=RESUME_MAY_CHANGE), cfg.model_dump(exclude=RESUME_MAY_CHANGE))
    if changed:
        raise ValueError(f"--resume: the config differs from the one {run_dir} was started with "
                         f"({run_dir / 'config.yaml'}): {'; '.join(changed)}. Resume with that config (only "
                         f"output.* and train.{', train.'.join(sorted(RESUME_MAY_CHANGE['train']))} may change)")
    at = read_loop_state(last)
    log.info("resuming %s at step %d (stage %d, epoch %d, batch %d of it)", run_dir, at.step, at.stage + 1,
             at.epoch + 1, at.batch)


def make_accelerator(precision: str) -> Any:
    import torch
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if problem := precision_problem(precision):  # a saved run's precision on this machine (train checked it first)
        raise ValueError(problem)
    # cpu=True on a CPU-only machine lets torchrun/accelerate launch form a multi-process (gloo) group.
    return Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=not cuda)


def count_params(model: Any, names: set[str]) -> tuple[int, int]:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names), sum(p.numel() for p in params.values())


def pad_multiple(configured: int | None, max_length: int, device: str) -> int:
    """train.pad_to_multiple_of, or its default: 8 on a CPU; on a GPU coarse enough for at most 8 batch widths
    up to `max_length` (each width is an eager step, a CUDA-graph recording and new kernel plans)."""
    if configured:
        return configured
    return 8 if device != "cuda" else 8 * -(-max_length // 64)


class Session:
    """A task with its tokenizer and model, ready to encode inputs and run them (training or a saved run)."""

    def __init__(self, cfg: RunConfig, task: Any, tokenizer: Any, model: Any, accelerator: Any) -> None:
        from lmtune import models

        self.cfg, self.task, self.tokenizer, self.model, self.accelerator = cfg, task, tokenizer, model, accelerator
        self.max_length = models.max_length(cfg.model, tokenizer, model.config)
        multiple = pad_multiple(cfg.train.pad_to_multiple_of, self.max_length, accelerator.device.type)
        widest = batch_width(self.max_length, 8)
        self.collate = task.collate(tokenizer, multiple, max_width=widest)
        self.width = functools.partial(batch_width, multiple=multiple, max_width=widest)  # as the collate pads
        self.batch_size = cfg.eval.batch_size or 2 * cfg.train.batch_size

    def encode(self, ds: Any) -> Any:
        return self.task.encode(ds, self.tokenizer, self.max_length)

    def outputs(self, features: Any, model: Any | None = None) -> Any:
        from lmtune.training.loop import iterate_outputs

        return iterate_outputs(model or self.model, features, self.collate, self.batch_size, self.accelerator,
                               width=self.width)

    def evaluate(self, features: Any, model: Any | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        return self.task.evaluate(self.outputs(features, model), features)

    def generate(self, inputs: list[Any]) -> list[dict[str, Any]]:
        """Predictions of a generating task (causal LMs) for inputs from its `from_texts`."""
        return self.task.generate(self.model, self.tokenizer, inputs, self.accelerator.device)

    def score_generations(self, ds: Any) -> dict[str, Any]:
        return self.task.score_generations(ds, self.generate) if hasattr(self.task, "score_generations") else {}


def train(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, *, resume: bool = False,
          callbacks: list[Callable] | None = None) -> RunResult:
    """Fine-tune as configured and write a run directory; returns its path and final metrics.

    With `train.seeds`, one run per seed goes under one folder: see `lmtune.seeds.train_seeds` for the result.
    The run's folder is locked while it trains; Ctrl-C raises `RunInterrupted` (a KeyboardInterrupt) saying how
    to continue."""
    cfg = load_config(config, overrides)
    setup = check_setup(cfg)  # what validate checks beyond the config file, before anything is written
    stem = Path(config).stem if isinstance(config, (str, Path)) else "run"
    if cfg.train.seeds:
        from lmtune.seeds import train_seeds

        return train_seeds(cfg, stem, resume=resume, callbacks=callbacks)
    accelerator = make_accelerator(cfg.train.precision)
    # One process picks, creates and locks the run directory; the others are told its name (or that it failed).
    picked, lock, problem = [None], None, None
    if accelerator.is_main_process:
        try:
            run_dir, lock = _run_dir(cfg, stem, resume)
            picked = [str(run_dir)]
        except Exception as err:
            problem = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(picked)
    if problem is not None:
        raise problem
    if picked[0] is None:
        raise RuntimeError("the main process could not create the run directory (its error is in its log)")
    run_dir = Path(picked[0])
    try:
        return _train(cfg, setup, accelerator, run_dir, resume, callbacks)
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir) from None
    finally:
        if lock is not None:
            lock.release()


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: says whether and how it can be continued."""

    def __init__(self, run_dir: Path) -> None:
        from lmtune.training.checkpoint import read_loop_state

        last = run_dir / "checkpoints" / "last"
        if (last / "loop_state.json").is_file():
            how = (f"its last checkpoint (step {read_loop_state(last).step}) is kept: the same `lmtune train` command "
                   "with --resume continues it from there")
        else:
            how = "no checkpoint was written yet, so there is nothing to resume: train again"
        super().__init__(f"interrupted; run directory {run_dir}: {how}")
        self.run_dir = run_dir


def _train(cfg: RunConfig, setup: Any, accelerator: Any, run_dir: Path, resume: bool,
           callbacks: list[Callable] | None) -> RunResult:
    import transformers

    from lmtune import models
    from lmtune.methods import TaskInfo
    from lmtune.training.checkpoint import write_text
    from lmtune.training.loop import Job, fit

    log.info("run directory: %s", run_dir)
    if accelerator.is_main_process:
        write_text(run_dir / "config.yaml", cfg.to_yaml())
    transformers.set_seed(cfg.train.seed)

    task, tokenizer = setup.task, setup.tokenizer
    with accelerator.main_process_first():  # the main process fills the datasets cache, the rest read it
        splits, data_report = task.load_splits(cfg.train.seed)
        model, new_weights = models.load_model(task.auto_class, cfg.model, **task.model_kwargs())
        session = Session(cfg, task, tokenizer, model, accelerator)
        features = {name: session.encode(ds) for name, ds in splits.items()}
    data_report.update(getattr(task, "encode_report", {}))
    if cfg.eval.general_text or getattr(cfg.task, "eval_generate", False):
        model.to(accelerator.device)  # measured before training: where it will train
    probe = _general_text_probe(cfg, session)
    generate_test = getattr(cfg.task, "eval_generate", False) and "test" in splits and cfg.eval.test
    before = session.score_generations(splits["test"]) if generate_test else None
    method = METHODS[cfg.method.name]
    info = TaskInfo(head_names=models.head_names(model, new_weights), epochs=cfg.train.epochs)
    if cfg.train.gradient_checkpointing:
        _checkpoint_activations(model)
    if hasattr(method, "prepare"):  # methods that wrap the model (peft adapters)
        model = session.model = method.prepare(model, info, cfg.method)
    if hasattr(task, "prepare_model"):  # e.g. the causal-LM tasks' memory-lean loss, on the wrapped model
        task.prepare_model(model)
    stages = method.apply(model, info, cfg.method)
    metric = cfg.eval.metric or task.default_metric
    has_validation = "validation" in features and len(features["validation"]) > 0
    job = Job(model=model, stages=stages, train_set=features["train"], collate=session.collate,
              evaluate=(lambda m: session.evaluate(features["validation"], m)[0]) if has_validation else None,
              metric=metric, greater_is_better=task.greater_is_better(metric), run_dir=run_dir,
              callbacks=list(callbacks or []), loss=_training_loss(cfg, task),
              count_targets=getattr(task, "count_targets", None), width=session.width)
    started = time.perf_counter()
    try:
        state = fit(job, cfg.train, accelerator, resume=resume)
    finally:
        if hasattr(task, "release_model"):
            task.release_model()
    train_seconds = sum(state.stage_seconds.values())
    model = session.model = job.model

    overfitting = _diagnose(run_dir, cfg, metric, task) if has_validation else None
    results: dict[str, Any] = {}
    for name in ("validation", "test"):
        if name in features and len(features[name]) and (name != "test" or cfg.eval.test):
            scalars, details = session.evaluate(features[name])
            results[name] = {**scalars, **details}
    if before is not None:
        results["test"]["generation"] = session.score_generations(splits["test"])
        results["test"]["generation_before_training"] = before
    if probe is not None:
        results["forgetting"] = probe()
    trainable, total = count_params(model, {n for s in stages for n in s.trainable})
    metrics = {
        "run": run_dir.name, "task": cfg.task.name, "method": cfg.method.name, "model": cfg.model.name,
        "selection": {"metric": metric, "best": state.best_metric, "best_step": state.best_step},
        **results,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds_after_resume": round(time.perf_counter() - started, 2),
        "stage_seconds": {k: round(v, 2) for k, v in state.stage_seconds.items()},
        "stages": state.stages,
        "train_examples_per_second": round(state.examples / train_seconds, 2) if train_seconds else None,
        "train_tokens_per_second": round(state.tokens / train_seconds, 1) if train_seconds else None,
        "params": {"trainable": trainable, "total": total},
        "data": data_report,
        **({"overfitting": overfitting} if overfitting else {}),
    }
    from lmtune.training.guard import diverged, weights_finite

    if not weights_finite(list(model.parameters()), accelerator):  # never saved as the run's model
        raise diverged(run_dir, state.step, "the final weights hold values that are not finite (NaN/inf)")
    if accelerator.is_main_process:
        _save_outputs(run_dir, model, tokenizer, task, metrics, metric)
    accelerator.wait_for_everyone()
    return RunResult(run_dir, metrics)


def _general_text_probe(cfg: RunConfig, session: Session) -> Callable[[], dict[str, Any]] | None:
    """Perplexity on general text now (before training); the returned call measures it again after."""
    if not cfg.eval.general_text:
        return None
    from lmtune.data.text import read_documents
    from lmtune.tasks.lm_common import text_perplexity

    texts = read_documents(cfg.eval.general_text)["text"][:cfg.eval.general_text_max_documents]

    def measure() -> float:
        return text_perplexity(session.model, session.tokenizer, texts, session.max_length, session.batch_size,
                               session.accelerator)["perplexity"]

    before = measure()
    log.info("forgetting probe: perplexity on %s before training: %.3f", cfg.eval.general_text, before)

    def after() -> dict[str, Any]:
        value = measure()
        change = (value - before) / before
        log.info("forgetting probe: perplexity on %s %.3f before, %.3f after training (%+.1f%%)",
                 cfg.eval.general_text, before, value, 100 * change)
        return {"general_text": cfg.eval.general_text, "documents": len(texts), "perplexity_before": before,
                "perplexity_after": value, "relative_change": change}

    return after


def _diagnose(run_dir: Path, cfg: RunConfig, metric: str, task: Any) -> dict[str, Any]:
    from lmtune.evaluation.overfitting import diagnose
    from lmtune.training.logs import read_records

    diagnosis = diagnose(read_records(run_dir), metric, task.greater_is_better(metric), best_kept=cfg.train.load_best,
                         min_delta=cfg.train.early_stopping_min_delta)
    log.info("overfitting: %s", diagnosis["message"])
    return diagnosis


def _checkpoint_activations(model: Any) -> None:
    """train.gradient_checkpointing: keep each layer's input only, recompute the rest in backward."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    # Not the reentrant variant: it needs inputs that require grad (frozen embeddings, adapters) and breaks DDP.
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def _training_loss(cfg: RunConfig, task: Any) -> Callable | None:
    """The model's own loss, or label-smoothed cross-entropy over the task's targets (`check_setup` made sure that
    the task has some)."""
    if not cfg.train.label_smoothing:
        return None
    from lmtune.training.losses import cross_entropy_loss

    return cross_entropy_loss(task.cross_entropy_targets, cfg.train.label_smoothing)


def _save_outputs(run_dir: Path, model: Any, tokenizer: Any, task: Any, metrics: dict, metric: str) -> None:
    from lmtune.evaluation.plots import plot_confusion_matrix, plot_learning_curves, plot_overfitting
    from lmtune.training.checkpoint import replace_dir, write_text
    from lmtune.training.logs import finite_json, read_records

    tmp = run_dir / "model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # a peft model saves its adapter (and head) only
    if is_adapter(model):
        model.get_base_model().config.save_pretrained(tmp / "base_config")  # label names for reloading
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, run_dir / "model")
    write_text(run_dir / "metrics.json", json.dumps(finite_json(metrics), indent=2, default=str, allow_nan=False))
    plot_learning_curves(read_records(run_dir), run_dir / "plots" / "learning_curves.png", metric)
    if "overfitting" in metrics:
        plot_overfitting(metrics["overfitting"], run_dir / "plots" / "overfitting.png")
    for split in ("test", "validation"):
        matrix = metrics.get(split, {}).get("confusion_matrix")
        if matrix:
            plot_confusion_matrix(matrix, metrics[split]["labels"], run_dir / "plots" / f"confusion_{split}.png",
                                  title=f"Confusion matrix ({split})")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only needed to resume an unfinished run


class Predictor:
    """A finished run loaded back for prediction and evaluation: `lmtune.load(run_dir)`.

    A run folder is data: the code and pickle permissions in its config.yaml are ignored; only the caller's
    `trust_remote_code` / `allow_pickle` (command-line flags, keyword arguments) let its model run code."""

    def __init__(self, run_dir: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
        from lmtune import models

        self.run_dir = Path(run_dir)
        folder = self.run_dir / "model"
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{self.run_dir} holds no finished model (expected {folder}/config.json)")
        cfg = load_config(self.run_dir / "config.yaml")
        cfg.model = cfg.model.model_copy(update={"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle})
        adapter = (folder / "adapter_config.json").is_file()
        model_cfg = cfg.model.model_copy(update={"name": str(folder / "base_config" if adapter else folder)})
        model_config = models.load_model_config(model_cfg)
        labels = [model_config.id2label[i] for i in range(len(model_config.id2label))] \
            if getattr(model_config, "id2label", None) else None
        task = TASKS[cfg.task.name](cfg.task, cfg.data, labels=labels)
        if adapter:
            import peft

            # The pretrained backbone as in training, then the saved adapter and head on top. Its load report would
            # call the head "MISSING" (newly initialised): true for a moment, the adapter's copy replaces it.
            report = logging.getLogger("transformers.modeling_utils")
            level = report.level
            report.setLevel(logging.ERROR)
            try:
                base, _ = models.load_model(task.auto_class, cfg.model, **task.model_kwargs())
            finally:
                report.setLevel(level)
            model = peft.PeftModel.from_pretrained(base, folder)
        else:
            model, _ = models.load_model(task.auto_class, model_cfg)
        accelerator = make_accelerator(cfg.train.precision)
        model.to(accelerator.device)
        self.session = Session(cfg, task, models.load_tokenizer(model_cfg, folder), model, accelerator)

    def predict(self, inputs: list[Any]) -> list[dict[str, Any]]:
        """Predict for raw inputs (strings, or dicts with the task's input fields)."""
        task = self.session.task
        if hasattr(task, "generate"):
            return self.session.generate(task.from_texts(list(inputs)))
        features = self.session.encode(task.from_texts(list(inputs)))
        return [pred if _finite(pred) else {"error": "the model's scores for this input are not finite (NaN/inf): "
                                                     "the model is broken (a diverged run?)"}
                for pred in task.postprocess(self.session.outputs(features), len(features))]

    def evaluate(self, path: str | Path, on_bad_rows: str | None = None) -> dict[str, Any]:
        """Score the model on a labelled file in the same format as the training data; bad rows are an error, or
        with on_bad_rows="skip" dropped (default: the run's data.on_bad_rows)."""
        task, configured = self.session.task, self.session.task.data
        try:
            if on_bad_rows is not None:
                task.data = configured.model_copy(update={"on_bad_rows": on_bad_rows})
            raw = task.load_eval_file(str(path))
        finally:
            task.data = configured
        features = self.session.encode(raw)
        scalars, details = self.session.evaluate(features)
        generation = self.session.score_generations(raw)
        return {**scalars, **details, "rows": len(features), **({"generation": generation} if generation else {})}


def _finite(value: Any) -> bool:
    """Whether every number in a prediction is finite (JSON has no NaN)."""
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    if isinstance(value, (list, tuple)):
        return all(map(_finite, value))
    return not isinstance(value, float) or math.isfinite(value)


def is_adapter(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def export(run_dir: str | Path, output: str | Path, merge: bool = True, overwrite: bool = False,
           **permissions: bool) -> Path:
    """Write the run's model as a plain HF folder; adapters are merged into the weights (`merge`).

    An existing non-empty `output` folder is replaced only with `overwrite`, and only if an earlier export wrote it
    (its `.lmtune` marker); a file, the run directory, a folder holding it or one inside it never is."""
    import tempfile

    from lmtune import rundir
    from lmtune.training.checkpoint import replace_dir

    output = Path(output)
    rundir.refuse_special(output)
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"{output} is a file; export writes a folder: choose another --output")
        if Path(run_dir).resolve().is_relative_to(output.resolve()):
            raise ValueError(f"{output} holds the run {run_dir} itself: choose another --output")
        if any(output.iterdir()) and not overwrite:
            raise ValueError(f"{output} exists and is not empty: choose another --output, or pass --overwrite to "
                             "replace it")
    if output.resolve().is_relative_to(Path(run_dir).resolve()):  # its model/, plots/ ... would be replaced
        raise ValueError(f"{output} lies inside the run {run_dir}: choose a folder outside it for --output")
    if output.is_dir() and any(output.iterdir()) and (rundir.read_marker(output) or {}).get("kind") != "export":
        raise rundir.FolderError(f"{output} was not written by `lmtune export` (it has no {rundir.MARKER} marker of "
                                 "one): --overwrite replaces only an earlier export; choose another --output or move "
                                 "that folder away yourself")
    session = Predictor(run_dir, **permissions).session
    model = session.model
    if is_adapter(model):
        if model.active_peft_config.is_prompt_learning:
            raise ValueError(f"{run_dir} holds a prompt-tuning adapter: its virtual tokens are added at run time and "
                             "cannot be merged into the weights; use the run itself (lmtune.load, lmtune predict)")
        if not merge:
            raise ValueError(f"{run_dir} holds an adapter: export it with --merge")
        model = model.merge_and_unload()
    rundir.make_parent(output.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))  # a name of its own
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        model.save_pretrained(tmp)
        session.tokenizer.save_pretrained(tmp)
        (tmp / rundir.MARKER).write_text(json.dumps({"kind": "export", "run": str(run_dir)}), encoding="utf-8")
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def load(run_dir: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> Predictor:
    """A finished run, ready to predict; `trust_remote_code` / `allow_pickle` are yours to give (never its config's)."""
    return Predictor(run_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def evaluate(run_dir: str | Path, data: str | Path, on_bad_rows: str | None = None, **permissions: bool
             ) -> dict[str, Any]:
    return Predictor(run_dir, **permissions).evaluate(data, on_bad_rows)
