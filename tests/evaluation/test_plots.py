"""Tests for the learning-curve and confusion-matrix PNGs."""

import math
import random

import pytest

from lmtune.evaluation.plots import plot_confusion_matrix, plot_learning_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_kb=10):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_kb * 1024
    # No temp file is left beside the plot after the atomic rename.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def _records(stages=("full",), steps_per_stage=60, eval_every=20, log_every=2):
    """metrics.jsonl lines with a falling loss, rising accuracy and a global step counter."""
    rng = random.Random(0)
    lines, step = [], 0
    for stage in stages:
        for _ in range(steps_per_stage // log_every):
            step += log_every
            loss = 1.2 * math.exp(-step / 60) + 0.1 + rng.uniform(-0.05, 0.05)
            lines.append({"step": step, "epoch": step / 40, "stage": stage, "train/loss": loss,
                          "lr": 3e-5})
            if step % eval_every == 0:
                lines.append({"step": step, "stage": stage, "eval/loss": loss + 0.1,
                              "eval/runtime": 1.5, "eval/accuracy": min(0.95, 0.5 + step / 400),
                              "eval/f1": min(0.9, 0.4 + step / 400)})
    return lines


def test_learning_curves_writes_png(tmp_path):
    out = plot_learning_curves(_records(), tmp_path / "plots" / "learning_curves.png")
    assert out == tmp_path / "plots" / "learning_curves.png"
    _assert_png(out)


def test_learning_curves_none_without_train_loss(tmp_path):
    path = tmp_path / "lc.png"
    assert plot_learning_curves([], path) is None
    evals_only = [{"step": 10, "stage": "full", "eval/loss": 0.6, "eval/accuracy": 0.8}]
    assert plot_learning_curves(evals_only, path) is None
    assert not path.exists()


def test_learning_curves_two_stages(tmp_path):
    records = _records(stages=("head", "full"))
    out = plot_learning_curves(records, tmp_path / "lc.png", metric="f1")
    _assert_png(out)


def test_learning_curves_train_loss_only_and_missing_metric(tmp_path):
    records = [{"step": s, "stage": "full", "train/loss": 1.0 / s} for s in range(1, 10)]
    _assert_png(plot_learning_curves(records, tmp_path / "a" / "lc.png"), min_kb=5)
    # A metric that was never logged leaves just the loss panel rather than failing the run.
    _assert_png(plot_learning_curves(records, tmp_path / "b" / "lc.png", metric="accuracy"),
                min_kb=5)


def test_learning_curves_tolerates_resume_duplicates_and_nan(tmp_path):
    records = _records(stages=("head", "full"))
    # A resume replays some steps; a diverged step logs NaN. Neither may break the plot.
    records += records[40:60] + [{"step": 200, "stage": "full", "train/loss": float("nan")}]
    _assert_png(plot_learning_curves(records, tmp_path / "lc.png"))


def test_learning_curves_overwrites_existing_file(tmp_path):
    path = tmp_path / "lc.png"
    path.write_bytes(b"old")
    plot_learning_curves(_records(), path)
    _assert_png(path)


@pytest.mark.parametrize("n", [3, 25])
def test_confusion_matrix(tmp_path, n):
    rng = random.Random(n)
    labels = [f"class_{i}" for i in range(n)]
    labels[-1] = "a rather long label name that needs shortening"
    matrix = [[(rng.randint(20, 80) if i == j else rng.randint(0, 6)) for j in range(n)]
              for i in range(n)]
    matrix[0] = [0] * n  # a class absent from the eval set must not divide by zero
    out = plot_confusion_matrix(matrix, labels, tmp_path / f"cm_{n}.png")
    assert out == tmp_path / f"cm_{n}.png"
    _assert_png(out)


def test_confusion_matrix_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="3 labels"):
        plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "cm.png")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("key, best", [("eval/has_answer_f1", 0.7), ("eval/no_answer_exact", 0.7),
                                       ("eval/loss", 0.4), ("eval/perplexity", 0.4), ("eval/brier", 0.4),
                                       ("eval/ece", 0.4)])
def test_best_point_by_the_words_of_the_metric_name(key, best):
    from matplotlib.figure import Figure

    from lmtune.evaluation.plots import _draw_eval

    ax = Figure().add_subplot()
    _draw_eval(ax, [(100, 0.4), (200, 0.55), (300, 0.7)], key, "tab:orange")
    assert any(label.startswith(f"best {key[5:]} {best:g} ") for label in ax.get_legend_handles_labels()[1])


def test_the_run_says_which_way_its_metric_goes(tmp_path, monkeypatch):
    """A run selecting by a metric the name words do not cover stars the point its selection took."""
    import lmtune.evaluation.plots as plots

    records = [{"step": s, "train/loss": 1.0 / s, "eval/calibrated_score": v}
               for s, v in ((10, 0.4), (20, 0.55), (30, 0.7))]
    labels: list[str] = []
    real = plots._draw_eval

    def spy(ax, points, key, color, lower=None):
        real(ax, points, key, color, lower)
        labels.extend(ax.get_legend_handles_labels()[1])

    monkeypatch.setattr(plots, "_draw_eval", spy)
    for greater, best in ((True, "0.7 @ step 30"), (False, "0.4 @ step 10")):
        labels.clear()
        plots.plot_learning_curves(records, tmp_path / "c.png", "calibrated_score", greater_is_better=greater)
        assert any(label.endswith(best) for label in labels), labels
