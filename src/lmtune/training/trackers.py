"""Experiment trackers (`output.report_to`): TensorBoard, MLflow, Weights & Biases. Each gets the flattened config
as parameters, every logged metric at its step, the final metrics, and the run's files as artifacts."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lmtune.errors import ConfigError

if TYPE_CHECKING:
    from lmtune.config import RunConfig

log = logging.getLogger("lmtune")
EXTRAS = {"mlflow": "mlflow-skinny", "wandb": "wandb"}  # the package each tracker needs (lmtune[mlflow] ...)
IDS = "trackers.json"  # in the run folder: each tracker's run id, so a resumed run goes on in the same tracker run


def tracker_problem(report_to: list[str]) -> str | None:
    """A tracker `output.report_to` names whose package is not installed (TensorBoard is optional), said with the
    command that installs it: checked before anything trains (`lmtune validate` too)."""
    import importlib.util

    missing = [kind for kind in report_to if kind in EXTRAS and importlib.util.find_spec(kind) is None]
    return "; ".join(f"output.report_to: {kind} needs its package: pip install 'lmtune[{kind}]' (or pip install "
                     f"{EXTRAS[kind]})" for kind in missing) or None


def mlflow_uri(cfg: RunConfig) -> str:
    """Where a run's MLflow tracker writes: output.mlflow_uri, else MLFLOW_TRACKING_URI, else `<output.dir>/mlflow.db`."""
    return cfg.output.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(cfg.output.dir).resolve() / 'mlflow.db'}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 5e-05, ...}: a config dump as dotted names (lists kept as text)."""
    if not isinstance(tree, dict):
        return {prefix: tree if isinstance(tree, (int, float, str, bool)) or tree is None else str(tree)}
    return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}.{key}" if prefix else key).items()}


def group_of(run_dir: Path) -> str:
    """What runs group under: the folder holding the run (a compare's, a several-seed run's, a search's)."""
    parent = run_dir.parent
    return parent.parent.name if parent.name == "trials" else parent.name


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among `values` (what a tracker can plot)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _local_store(uri: str) -> Path | None:
    """The folder of a local MLflow store (`sqlite:///path/file.db`, `file:///path`, a plain path), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent
    if uri.startswith("file:"):
        from urllib.parse import urlparse

        return Path(urlparse(uri).path).resolve()
    return None if "://" in uri else Path(uri).resolve()


class TensorBoard:
    """Event files in the run's tensorboard/ folder (a resumed run appends to them)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resumed: dict[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run replays the steps after its checkpoint: TensorBoard hides what the first process wrote for them.
        replayed = _replayed_from(run_dir)
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=replayed)
        if replayed is None:  # (a resumed run wrote its config when it started)
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False) + "```")

    def log(self, step: int, values: dict[str, Any]) -> None:
        for key, value in _numbers(values).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, metrics: dict[str, Any], files: list[Path], run_dir: Path) -> None:
        self.log(metrics.get("steps", 0), _final(metrics))  # (the files are beside the event files, in the run folder)
        self.writer.close()

    def fail(self) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per lmtune run, in the experiment named after its group; the tracking URI from
    output.mlflow_uri, else MLFLOW_TRACKING_URI, else a store beside the runs (`<output.dir>/mlflow.db`, its
    artifacts in `<output.dir>/mlartifacts`)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resumed: dict[str, Any] | None = None) -> None:
        import mlflow

        uri = mlflow_uri(cfg)
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.sent = -1  # a resumed run's replayed steps up to this one were sent by the first process: not again
        if resumed and resumed.get("uri") == uri and self._reopen(resumed["run_id"]):
            self.run_id, self.ids = resumed["run_id"], resumed
            self.sent = max((m.step for m in self.client.get_metric_history(self.run_id, "train.loss")), default=-1)
            log.info("mlflow: run %s goes on at %s", self.run_id, uri)
            return
        name = group_of(run_dir)
        experiment = self.client.get_experiment_by_name(name)
        # A local store (SQLite, files) keeps its artifacts beside it, never in the working directory (MLflow's
        # default for a database store); a tracking server keeps its own artifact location.
        store = _local_store(uri)
        local = (store / "mlartifacts" / name).as_uri() if store is not None else None
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=local)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name,
                                             tags={"lmtune.group": name, "lmtune.task": cfg.task.name,
                                                   "lmtune.method": cfg.method.name}).info.run_id
        self.ids = {"run_id": self.run_id, "uri": uri}
        params = flatten(cfg.model_dump(mode="json"))
        self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in params.items()])
        log.info("mlflow: run %s in experiment %r at %s", self.run_id, name, uri)

    def _reopen(self, run_id: str) -> bool:
        """Mark the run a resumed lmtune run started as running again; False where the store no longer has it."""
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted, or another store: a new run is opened
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def log(self, step: int, values: dict[str, Any], final: bool = False) -> None:
        import time

        from mlflow.entities import Metric

        if step <= self.sent and not final:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key.replace("/", "."), value, now, step) for key, value in _numbers(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, metrics: dict[str, Any], files: list[Path], run_dir: Path) -> None:
        self.log(metrics.get("steps", 0), _final(metrics), final=True)
        for file in files:
            relative = file.relative_to(run_dir)
            self.client.log_artifact(self.run_id, str(file), None if relative.parent == Path(".") else
                                     str(relative.parent))
        self.client.set_terminated(self.run_id)

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


class WandB:
    """One W&B run per lmtune run (project `lmtune`, grouped), its files under the run folder; `WANDB_MODE=offline`
    runs without an account."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resumed: dict[str, Any] | None = None) -> None:
        import wandb

        again = {"id": resumed["id"], "resume": "allow"} if resumed and resumed.get("id") else {}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmtune"), name=run_dir.name,
                              group=group_of(run_dir), dir=str(run_dir), config=flatten(cfg.model_dump(mode="json")),
                              tags=[cfg.task.name, cfg.method.name], reinit="finish_previous", **again)
        self.ids = {"id": self.run.id}

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.run.log(_numbers(values), step=step)

    def finish(self, metrics: dict[str, Any], files: list[Path], run_dir: Path) -> None:
        self.run.summary.update(_final(metrics))
        for file in files:
            self.run.save(str(file), base_path=str(run_dir), policy="now")
        self.run.finish()

    def fail(self) -> None:
        self.run.finish(exit_code=1)


def _replayed_from(run_dir: Path) -> int | None:
    """The first step a resumed run replays (its checkpoint's step + 1), None for a run starting afresh."""
    from lmtune.training.checkpoint import read_loop_state

    last = run_dir / "checkpoints" / "last"
    return read_loop_state(last).step + 1 if (last / "loop_state.json").is_file() else None


def _final(metrics: dict[str, Any]) -> dict[str, float]:
    """metrics.json's numbers of the validation and test splits (each named test set) and the forgetting probes, as
    `final/<split>/<metric>` (`final/test-ood/...` for a test set named `ood`, `final/forgetting/...`)."""
    from lmtune.split_names import eval_split_names, plot_stem

    return {f"final/{plot_stem(split)}/{k}": v for split in [*eval_split_names(metrics), "forgetting"]
            for k, v in _numbers(metrics.get(split) or {}).items()}


KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def open_trackers(cfg: RunConfig, run_dir: Path, resume: bool = False) -> list[Any]:
    """The trackers output.report_to names, opened for this run (a missing package is a clear error); a resumed run
    goes on in the tracker runs it started (their ids in trackers.json)."""
    import json

    from lmtune.files import write_text

    saved = json.loads((run_dir / IDS).read_text(encoding="utf-8")) if resume and (run_dir / IDS).is_file() else {}
    opened: list[Any] = []
    ids: dict[str, Any] = {}
    try:
        for kind in cfg.output.report_to:
            try:
                opened.append(KINDS[kind](cfg, run_dir, saved.get(kind)))
                ids.update({kind: opened[-1].ids} if getattr(opened[-1], "ids", None) else {})
            except ImportError:
                if kind == "tensorboard":  # TensorBoard is optional: metrics.jsonl is the record
                    continue
                raise ConfigError(tracker_problem([kind]) or f"output.report_to: {kind} could not be imported") \
                    from None
        if ids:
            write_text(run_dir / IDS, json.dumps(ids, indent=1))
    except BaseException:
        for tracker in opened:  # those opened before the one that failed end as failed, not left running
            with contextlib.suppress(Exception):
                tracker.fail()
        raise
    return opened


def run_files(run_dir: Path) -> list[Path]:
    """What a tracker keeps of a finished run: config, metrics, worst mistakes, the report, plots, model card."""
    names = ["config.yaml", "metrics.json", "mistakes.json", "report.html", "model/README.md"]
    return [run_dir / n for n in names if (run_dir / n).is_file()] + sorted((run_dir / "plots").glob("*.png"))


class Trackers:
    """The trackers of one run (none on other processes than the main one)."""

    def __init__(self, opened: list[Any], run_dir: Path) -> None:
        self.opened, self.run_dir = opened, run_dir

    def log(self, step: int, values: dict[str, Any]) -> None:
        for tracker in self.opened:
            tracker.log(step, values)

    def finish(self, metrics: dict[str, Any]) -> None:
        files = run_files(self.run_dir)
        for tracker in self.opened:
            tracker.finish(metrics, files, self.run_dir)
        self.opened = []


@contextlib.contextmanager
def tracking(cfg: RunConfig, run_dir: Path, accelerator: Any, resume: bool = False) -> Iterator[Trackers]:
    """The run's trackers for the block; a block that fails marks their runs failed."""
    trackers = Trackers(open_trackers(cfg, run_dir, resume) if accelerator.is_main_process else [], run_dir)
    try:
        yield trackers
    except BaseException:
        for tracker in trackers.opened:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                tracker.fail()
        raise
