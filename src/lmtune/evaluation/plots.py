"""PNG plots of a run: learning curves from metrics.jsonl, the overfitting picture and confusion matrices."""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Figure + FigureCanvasAgg rather than pyplot: no global backend or figure registry is touched, so
# plotting is safe in threads, in notebooks and on machines without a display.
_DPI = 120
# Words of metric names (split at _ / - .) where a smaller value is better; everything else is maximised.
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "wer", "cer", "mse", "mae", "rmse", "ece", "brier")
_TRAIN_LOSS = "train/loss"
_EVAL_LOSS = "eval/loss"
# eval/* keys that are bookkeeping, not quality: never picked as "the" metric automatically.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "tokens_per_second", "time",
                "epoch", "step", "num_examples")


def plot_learning_curves(
    records: list[dict], path: str | os.PathLike, metric: str | None = None, greater_is_better: bool | None = None
) -> Path | None:
    """Plot train/eval loss and one eval metric against step; returns None when nothing to plot.

    `records` are the lines of a run's metrics.jsonl. `metric` is `"accuracy"` or `"eval/accuracy"`;
    None picks the first `eval/*` key that is not the loss. A requested metric that was never
    logged leaves only the loss panel. Stage changes are drawn as dashed lines, the best eval point
    as a star (the best by `greater_is_better` where the run said which way its metric goes, else by its name).
    """
    records = [r for r in records if isinstance(r, dict)]
    xs = [_number(r.get("step")) for r in records]
    train = _series(records, xs, _TRAIN_LOSS)
    if not train:
        return None
    eval_loss = _series(records, xs, _EVAL_LOSS)
    metric_key = _pick_metric(records, metric)
    metric_pts = _series(records, xs, metric_key) if metric_key else []

    n_panels = 2 if metric_pts else 1
    fig = Figure(figsize=(6.0 * n_panels + 0.5, 4.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, sharex=True, squeeze=False)[0]

    loss_ax = axes[0]
    _draw_train_loss(loss_ax, train)
    if eval_loss:
        _draw_eval(loss_ax, eval_loss, _EVAL_LOSS, color="tab:orange")
    loss_ax.set_title("Loss")
    loss_ax.set_ylabel("loss")
    if metric_pts:
        name = metric_key.removeprefix("eval/")
        _draw_eval(axes[1], metric_pts, metric_key, color="tab:green",
                   lower=None if greater_is_better is None else not greater_is_better)
        axes[1].set_title(f"Eval {name}")
        axes[1].set_ylabel(name)

    boundaries = _stage_starts(records, xs)
    for ax in axes:
        ax.set_xlabel("step")
        ax.margins(x=0.03, y=0.08)  # room for the best-point star at the edges
        ax.grid(True, alpha=0.3)
        _draw_stages(ax, boundaries)
        ax.legend(loc="best", fontsize=8, framealpha=0.85)
    return _save(fig, path)


def plot_overfitting(diagnosis: dict, path: str | os.PathLike) -> Path | None:
    """Train vs validation loss at each evaluation (from `evaluation.overfitting.diagnose`), the validation
    metric on a second axis, and the step where it peaked; None when there are too few evaluations."""
    rows = diagnosis.get("history", [])
    if len(rows) < 2 or "peak_step" not in diagnosis:
        return None
    fig = Figure(figsize=(7.0, 4.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key, color, label in (("train_loss", "tab:blue", "train loss (mean since last eval)"),
                              ("validation_loss", "tab:orange", "validation loss")):
        points = [(r["step"], r[key]) for r in rows if r[key] is not None]
        if points:
            ax.plot(*zip(*points), color=color, marker="o", markersize=4, linewidth=1.4, label=label)
    metric_ax = ax.twinx()
    metric_ax.plot([r["step"] for r in rows], [r["validation_metric"] for r in rows], color="tab:green",
                   linestyle="--", marker=".", label=f"validation {diagnosis['metric']}")
    metric_ax.set_ylabel(diagnosis["metric"])
    ax.axvline(diagnosis["peak_step"], color="grey", linestyle=":", linewidth=1.2)
    metric_ax.plot([diagnosis["peak_step"]], [diagnosis["peak_value"]], marker="*", markersize=15, color="gold",
                   markeredgecolor="black", linestyle="none", label=f"peak @ step {diagnosis['peak_step']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("overfit" if diagnosis["overfit"] else "no overfitting detected")
    ax.grid(True, alpha=0.3)
    handles = ax.get_legend_handles_labels()
    extra = metric_ax.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="best", fontsize=8, framealpha=0.85)
    return _save(fig, path)


def plot_confusion_matrix(
    matrix: list[list[int]],
    labels: list[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix",
) -> Path:
    """Plot a confusion matrix (rows = true, columns = predicted) coloured by row fraction."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(labels)
    if counts.ndim != 2 or counts.shape != (n, n):
        raise ValueError(
            f"confusion matrix has shape {counts.shape} but there are {n} labels; "
            f"expected ({n}, {n})"
        )
    row_sums = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)

    side = min(max(4.5, 0.42 * n + 2.5), 16.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    colorbar.set_label("fraction of true class (row)")

    cell_font = min(10.0, max(6.5, 11.0 - 0.13 * n))
    tick_font = min(10.0, max(7.0, 11.0 - 0.12 * n))
    for i in range(n):
        for j in range(n):
            # Zeros in a large matrix are noise; the empty (white) cell already says it.
            if counts[i, j] == 0 and n > 10:
                continue
            ax.text(
                j, i, str(counts[i, j]), ha="center", va="center", fontsize=cell_font,
                color="white" if frac[i, j] > 0.55 else "black",
            )
    short = [_shorten(str(label)) for label in labels]
    # Upright column labels only fit when they are short compared to a cell.
    slant = n > 6 or max(map(len, short), default=0) > 8
    ax.set_xticks(range(n), short, rotation=45 if slant else 0, ha="right" if slant else "center",
                  rotation_mode="anchor", fontsize=tick_font)
    ax.set_yticks(range(n), short, fontsize=tick_font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else float("nan")
    ax.set_title(f"{title}\naccuracy {accuracy:.1%} over {total} examples", fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------- learning-curve parts


def _series(records: list[dict], xs: list, key: str) -> list[tuple[float, float]]:
    """(x, value) pairs sorted by x; a step logged twice (after a resume) keeps its last value."""
    by_x: dict[float, float] = {}
    for record, x in zip(records, xs):
        value = _number(record.get(key))
        if x is not None and value is not None:
            by_x[x] = value
    return sorted(by_x.items())


def _pick_metric(records: Iterable[dict], metric: str | None) -> str | None:
    if metric is not None:
        return metric if metric.startswith("eval/") else f"eval/{metric}"
    for record in records:
        for key, value in record.items():
            name = key.removeprefix("eval/")
            if (key.startswith("eval/") and key != _EVAL_LOSS and name not in _NOT_METRICS
                    and _number(value) is not None):
                return key
    return None


def _stage_starts(records: list[dict], xs: list) -> list[tuple[float, str]]:
    """(x, stage) where each stage begins; empty when the run has a single stage."""
    starts: dict[str, float] = {}
    prev_x = None
    for record, x in zip(records, xs):
        stage = record.get("stage")
        if x is None or stage is None:
            continue
        # The true switch lies between the last logged step of one stage and the first of the next;
        # the earlier one is exact when a stage ends with a log line. A stage seen again (lines
        # replayed after a resume) keeps its first start.
        starts.setdefault(str(stage), prev_x if prev_x is not None else x)
        prev_x = x
    if len(starts) < 2:
        return []
    return sorted(((x, stage) for stage, x in starts.items()), key=lambda item: item[0])


def _draw_train_loss(ax, points: list[tuple[float, float]]) -> None:
    x, y = map(np.asarray, zip(*points))
    if len(points) >= 50:
        # Raw per-step loss is noisy; show it faintly under an exponential moving average.
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(x, _ema(y, alpha=2.0 / (1 + max(5, len(y) // 20))), color="tab:blue",
                linewidth=1.6, label="train loss (smoothed)")
    else:
        ax.plot(x, y, color="tab:blue", linewidth=1.4, marker="." if len(points) < 20 else None,
                label="train loss")


def _draw_eval(ax, points: list[tuple[float, float]], key: str, color: str, lower: bool | None = None) -> None:
    x, y = map(np.asarray, zip(*points))
    name = key.removeprefix("eval/")
    ax.plot(x, y, color=color, marker="o", markersize=4, linewidth=1.4, label=f"eval {name}")
    if lower is None:
        lower = any(word in _LOWER_IS_BETTER for word in re.split(r"[_/.-]", name.lower()))  # not "ans-wer"
    best = int(np.argmin(y) if lower else np.argmax(y))
    ax.plot(x[best], y[best], marker="*", markersize=15, color="gold", markeredgecolor="black",
            linestyle="none", zorder=5, label=f"best {name} {y[best]:.4g} @ step {x[best]:g}")


def _draw_stages(ax, starts: list[tuple[float, str]]) -> None:
    transform = ax.get_xaxis_transform()  # x in data, y in axes fraction: labels stay at the top
    for index, (x, stage) in enumerate(starts):
        if index > 0:
            ax.axvline(x, color="grey", linestyle="--", linewidth=1.0, zorder=1)
        ax.text(x, 0.985, f" {stage}", transform=transform, ha="left", va="top", fontsize=8,
                color="dimgrey", style="italic", zorder=6,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7,
                      "linewidth": 0})


def _ema(values: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(values, dtype=float)
    acc = float(values[0])
    for i, value in enumerate(values):
        acc = alpha * float(value) + (1 - alpha) * acc
        out[i] = acc
    return out


# ---------------------------------------------------------------------------------------- helpers


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _shorten(label: str, limit: int = 20) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write the figure as PNG atomically: a crash never leaves a half-written plot behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            # A tight box: long tick labels can push axis labels past the constrained layout.
            fig.savefig(handle, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a plot is meant to be read like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
