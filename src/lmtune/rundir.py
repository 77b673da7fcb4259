"""Run folders: names, opening one for a run (in a folder lmtune owns: lmtune.folders), what a resumed run may
change, and saving a finished run's outputs."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from lmtune.errors import ConfigError, FolderError
from lmtune.folders import MARKER, claim, empty, make_parent

if TYPE_CHECKING:
    from lmtune.config import RunConfig

log = logging.getLogger("lmtune")

# Options a resumed run may change: where outputs go, and how fast the same steps run (not what they compute).
# Not train.compile: compiled runs fold a one-row last batch into the one before it (other batches, other steps).
RESUME_MAY_CHANGE: dict[str, Any] = {"output": True, "train": {"cuda_graphs", "num_workers"}}


def find_run(root: Path, stem: str, resumable: Any) -> Path:
    """The latest `<stem>-<date>-<time>[-<n>]` folder under `root` that `resumable(folder)` accepts (for --resume):
    only this config's default names (`tiny-big-<date>-<time>` is another config's run, not tiny.yaml's)."""
    named = re.compile(rf"{re.escape(stem)}-(\d{{8}}-\d{{6}})(?:-(\d+))?")
    found = [(m[1], int(m[2] or 1), p) for p in root.glob(f"{stem}-*") if (m := named.fullmatch(p.name))]
    candidates = sorted((when, n, p) for when, n, p in found if resumable(p))
    if not candidates:
        raise FileNotFoundError(f"--resume: no unfinished run of {stem!r} under {root}/")
    return candidates[-1][2]


def new_folder(root: Path, stem: str) -> Path:
    """A new `<stem>-<date>-<time>` folder under `root`, made here (`-2`, `-3`... where runs of one config start
    within the same second: neither takes the other's)."""
    make_parent(root)
    name = new_name(stem)
    for n in range(1, 1000):
        folder = root / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FolderError(f"{root}/{name}: a thousand runs started this second; choose output.name")


def differences(saved: Any, now: Any, path: str = "") -> list[str]:
    """'train.lr: 2e-05 -> 3e-05' for every leaf that differs between two config dumps."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for key in dict.fromkeys([*saved, *now])
                for d in differences(saved.get(key), now.get(key), f"{path}.{key}" if path else key)]
    return [] if saved == now else [f"{path}: {saved!r} -> {now!r}"]


def config_stem(config: Any) -> str:
    """A run's default name starts with its config file's name ("run" for a config given as data)."""
    return Path(config).stem if isinstance(config, (str, Path)) else "run"


def new_name(stem: str) -> str:
    return f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: says whether and how it can be continued."""

    def __init__(self, run_dir: Path, mend: bool = False) -> None:
        from lmtune.training.checkpoint import has_checkpoint, read_loop_state

        last = run_dir / "checkpoints" / "last"
        # A Ctrl-C between the two renames of a save: mended first by the process holding the folder's lock.
        if has_checkpoint(run_dir, mend=mend) and (last / "loop_state.json").is_file():
            how = (f"its last checkpoint (step {read_loop_state(last).step}) is kept: the same `lmtune train` command "
                   "with --resume continues it from there")
        else:
            how = "no checkpoint was written yet, so there is nothing to resume: train again"
        super().__init__(f"interrupted; run directory {run_dir}: {how}")
        self.run_dir = run_dir


@contextlib.contextmanager
def open_run(cfg: RunConfig, stem: str, resume: bool, accelerator: Any
             ) -> Iterator[tuple[Path, RunConfig, Callable[[], None]]]:
    """(the run's folder, its config, `ready`) for the block: the folder picked, created (or taken over) and locked by
    the main process, its name told to the others; a resumed run keeps the Hub commits its config.yaml recorded;
    config.yaml written; Ctrl-C inside turned into `RunInterrupted`; the lock released after. A finished run that
    `output.overwrite` replaces is kept, config included, until the block calls `ready()` (once its data and model
    have loaded): a config that fails before then loses nothing."""
    picked, lock, problem, stale = [None, cfg, False], None, None, False
    if accelerator.is_main_process:
        try:
            run_dir, lock, cfg, stale = _claim_run(cfg, stem, resume)
            picked = [str(run_dir), cfg, stale]
        except Exception as err:
            problem = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(picked)
    if problem is not None:
        raise problem
    if picked[0] is None:
        raise RuntimeError("the main process could not create the run directory (its error is in its log)")
    run_dir, cfg, stale = Path(picked[0]), picked[1], picked[2]  # every process waits for the same barriers

    def write_config() -> None:
        from lmtune.files import write_text

        if accelerator.is_main_process:
            if stale:
                log.info("output.overwrite: replacing the run in %s", run_dir)
                empty(run_dir)
            write_text(run_dir / "config.yaml", cfg.to_yaml())
        accelerator.wait_for_everyone()

    def ready() -> None:
        if stale:
            write_config()

    try:
        log.info("run directory: %s", run_dir)
        if not stale:
            write_config()
        yield run_dir, cfg, ready
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir, mend=lock is not None) from None
    finally:
        if lock is not None:
            lock.release()


def _claim_run(cfg: RunConfig, stem: str, resume: bool) -> tuple[Path, Any, RunConfig, bool]:
    """The run's folder, created (or taken over) and locked for the run's life: (folder, lock, config, whether it
    still holds an earlier run that output.overwrite replaces once the new one has loaded its data and model)."""
    from lmtune.training.checkpoint import has_checkpoint

    root = Path(cfg.output.dir)
    if cfg.output.name:
        run_dir = root / cfg.output.name
    elif resume:
        run_dir = find_run(root, stem, lambda p: has_checkpoint(p, mend=False))
    else:
        run_dir = new_folder(root, stem)
    lock = claim(run_dir, "run", overwrite=cfg.output.overwrite, resume=resume, clear=False)
    stale = not resume and any(p.name != MARKER for p in run_dir.iterdir())
    if resume:
        try:
            cfg = _check_resume(cfg, run_dir)
        except BaseException:
            lock.release()
            raise
    return run_dir, lock, cfg, stale


def _check_resume(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """`cfg` as the resumed run goes on with it (Hub names at the commits it started on); refuses another config."""
    from lmtune.config import load_config
    from lmtune.training.checkpoint import has_checkpoint, read_loop_state

    last = run_dir / "checkpoints" / "last"
    if not has_checkpoint(run_dir):  # (mended first where a crash fell between the two renames of a save)
        raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from")
    saved = load_config(run_dir / "config.yaml")
    cfg = keep_pins(cfg, saved)  # `org/name` given again resumes on the commit it started on, whatever main is now
    refuse_changes(saved, cfg, run_dir)
    at = read_loop_state(last)
    log.info("resuming %s at step %d (stage %d, epoch %d, batch %d of it)", run_dir, at.step, at.stage + 1,
             at.epoch + 1, at.batch)
    return cfg


def refuse_changes(saved: RunConfig, cfg: RunConfig, run_dir: Path, may_change: tuple[str, ...] = ()) -> None:
    """--resume goes on only with the config `run_dir` started with: output.*, a few train.* settings (and the
    `may_change` train.* keys) excepted."""
    allowed = RESUME_MAY_CHANGE["train"] | set(may_change)
    exclude = {**RESUME_MAY_CHANGE, "train": allowed}
    changed = differences(saved.model_dump(exclude=exclude), cfg.model_dump(exclude=exclude))
    if changed:
        raise ValueError(f"--resume: the config differs from the one {run_dir} was started with "
                         f"({run_dir / 'config.yaml'}): {'; '.join(changed)}. Resume with that config (only "
                         f"output.* and train.{', train.'.join(sorted(allowed))} may change)")


def keep_pins(cfg: RunConfig, saved: RunConfig) -> RunConfig:
    """`cfg` with each Hub name given without a commit (`org/name`, `hf:org/name:train`) replaced by the pinned one
    `saved` holds for the same repository (and config, split): a resumed run goes on at the commits it started on."""
    from lmtune import hub

    def same(given: str | None, pinned: str | None, parse: Any) -> bool:
        if not given or not pinned or given == pinned:
            return False
        try:
            a, b = parse(given), parse(pinned)
        except Exception:  # noqa: BLE001 - not a Hub name: compared as it is
            return False
        return a is not None and b is not None and a[1] is None and (a[0], *a[2:]) == (b[0], *b[2:])

    update: dict[str, Any] = {}
    if not Path(cfg.model.name).expanduser().is_dir() and same(cfg.model.name, saved.model.name, hub.parse_id):
        update["model"] = cfg.model.model_copy(update={"name": saved.model.name})
    def kept(given: Any, pinned: Any) -> Any:  # a file name, or named test sets {name: file or {path: file, ...}}
        if isinstance(given, dict) and isinstance(pinned, dict):
            return {name: kept(value, pinned.get(name)) for name, value in given.items()}
        if isinstance(given, dict) and isinstance(pinned, str):  # a set's own settings beside its path
            return {**given, "path": kept(given.get("path"), pinned)}
        if isinstance(pinned, dict) and "path" in pinned:
            pinned = pinned["path"]
        if isinstance(given, str) and hub.is_dataset_name(given) and same(given, pinned, hub.parse_dataset_name):
            return pinned
        return given

    data = {k: new for k in ("train", "validation", "test")
            if (new := kept(getattr(cfg.data, k), getattr(saved.data, k))) != getattr(cfg.data, k)}
    if data:
        update["data"] = cfg.data.model_copy(update=data)
    return cfg.model_copy(update=update) if update else cfg


def save_outputs(run_dir: Path, model: Any, tokenizer: Any, task: Any, metrics: dict, cfg: RunConfig,
                 mistakes: dict | None = None, phases: Any = None) -> None:
    """The run's results: the model folder (with its card), metrics.json, mistakes.json, the plots, report.html; the
    checkpoints go. `phases` (timing.Phases) gets the saving's and the plots' laps."""
    from lmtune.split_names import eval_split_names, plot_stem
    from lmtune.evaluation.card import write_card
    from lmtune.evaluation.report import write_report
    from lmtune.evaluation.plots import plot_confusion_matrix, plot_learning_curves, plot_overfitting
    from lmtune.models import is_adapter
    from lmtune.files import replace_dir, write_text
    from lmtune.training.logs import finite_json, read_records

    tmp = run_dir / "model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # a peft model saves its adapter (and head) only
    if is_adapter(model):
        model.get_base_model().config.save_pretrained(tmp / "base_config")  # label names for reloading
    tokenizer.save_pretrained(tmp)
    write_card(tmp, cfg, metrics, task.pipeline_tag, adapter=is_adapter(model), final=run_dir / "model")
    replace_dir(tmp, run_dir / "model")
    write_text(run_dir / "metrics.json", json.dumps(finite_json(metrics), indent=2, default=str, allow_nan=False))
    if mistakes:
        write_text(run_dir / "mistakes.json", json.dumps(finite_json(mistakes), indent=1, ensure_ascii=False))
    if phases is not None:
        phases.lap("save")
    metric = metrics["selection"]["metric"]
    plot_learning_curves(read_records(run_dir), run_dir / "plots" / "learning_curves.png", metric,
                         metrics["selection"].get("greater_is_better"))
    if "overfitting" in metrics:
        plot_overfitting(metrics["overfitting"], run_dir / "plots" / "overfitting.png")
    for split in eval_split_names(metrics):
        stem = plot_stem(split)
        reliability = metrics.get(split, {}).get("reliability")
        if reliability:
            from lmtune.evaluation.calibration import plot_reliability

            plot_reliability(reliability["bins"], run_dir / "plots" / f"reliability_{stem}.png",
                             f"Reliability ({split}): ECE {metrics[split].get('ece', 0):.3f}")
        matrix = metrics.get(split, {}).get("confusion_matrix")
        if matrix:
            plot_confusion_matrix(matrix, metrics[split]["labels"], run_dir / "plots" / f"confusion_{stem}.png",
                                  title=f"Confusion matrix ({split})")
    write_report(run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only needed to resume an unfinished run
    if phases is not None:
        phases.lap("plots and report")


def refuse_run_folder(folder: Path, command: str) -> None:
    """A training run's own folder is no place for a compare or a search (and `train --overwrite` would delete it)."""
    if (folder / "metrics.json").is_file() or (folder / "checkpoints").is_dir():
        raise ConfigError(f"{command}: {folder} holds a training run; choose another output.name or --output")
