"""Calibration of class scores: expected calibration error (15 equal-width bins of confidence), the Brier score, the
reliability diagram's data, and temperature scaling (one temperature fitted on validation by NLL)."""

from __future__ import annotations

from typing import Any

import numpy as np

BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def calibration(probs: np.ndarray, gold: np.ndarray, multi_label: bool = False) -> tuple[dict[str, float], dict]:
    """(scalars: ece, brier; the reliability diagram's bins) for class probabilities `probs` [n, classes] and gold
    class indices [n] (multi-label: 0/1 targets [n, labels], each label's probability a binary forecast)."""
    if multi_label:
        confidence = np.where(probs >= 0.5, probs, 1 - probs).ravel()
        correct = ((probs >= 0.5) == gold.astype(bool)).ravel()
        brier = float(((probs - gold) ** 2).mean()) if probs.size else 0.0
    else:
        confidence, predicted = probs.max(-1), probs.argmax(-1)
        correct = predicted == gold
        onehot = np.eye(probs.shape[1])[gold] if len(gold) else probs
        brier = float(((probs - onehot) ** 2).sum(-1).mean()) if len(gold) else 0.0
    edges = np.linspace(0, 1, BINS + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, BINS - 1)
    bins, ece = [], 0.0
    for b in range(BINS):
        inside = which == b
        n = int(inside.sum())
        acc = float(correct[inside].mean()) if n else None
        conf = float(confidence[inside].mean()) if n else None
        if n:
            ece += n / len(confidence) * abs(acc - conf)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n, "accuracy": acc,
                     "confidence": conf})
    return {"ece": float(ece), "brier": brier}, {"bins": bins}


def best_thresholds(probs: np.ndarray, gold: np.ndarray) -> list[float]:
    """Multi-label: per label, the threshold (0.05 to 0.95 by 0.05) with the best F1 on these rows; ties go to the
    one nearest 0.5."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    chosen = []
    for j in range(probs.shape[1]):
        f1 = [2 * (p & gold[:, j]).sum() / max(p.sum() + gold[:, j].sum(), 1) for p in (probs[:, j][:, None] >= grid).T]
        best = max(f1)
        chosen.append(float(min((t for t, f in zip(grid, f1) if f == best), key=lambda t: abs(t - 0.5))))
    return chosen


def nll(logits: np.ndarray, gold: np.ndarray, temperature: float = 1.0) -> float:
    probs = softmax(logits, temperature)
    return float(-np.log(np.clip(probs[np.arange(len(gold)), gold], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, gold: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on (validation) rows: a 1-D convex problem in
    log T, solved by golden-section search on [1/20, 20]."""
    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, gold, np.exp(a)), nll(logits, gold, np.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, gold, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, gold, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def temperature_scaling(session: Any, features: dict[str, Any]) -> dict[str, Any]:
    """Fit the task's temperature on the validation rows (the run's final model), set it on the task, and report
    NLL and ECE before and after on each split in `features` (validation, test)."""
    task = session.task
    outputs = {name: list(session.outputs(f)) for name, f in features.items()}
    logits = {name: task.logits(iter(outs), len(features[name])) for name, outs in outputs.items()}
    gold = {name: np.asarray(features[name]["labels"][:]) for name in features}
    task.temperature = 1.0
    temperature = fit_temperature(logits["validation"], gold["validation"])
    report: dict[str, Any] = {"method": "temperature", "temperature": temperature}
    for name in features:
        before = calibration(softmax(logits[name]), gold[name])[0]
        after = calibration(softmax(logits[name], temperature), gold[name])[0]
        report[name] = {"nll_before": nll(logits[name], gold[name]), "nll_after": nll(logits[name], gold[name],
                                                                                           temperature),
                        "ece_before": before["ece"], "ece_after": after["ece"],
                        "brier_before": before["brier"], "brier_after": after["brier"]}
    task.temperature = temperature
    return report


def plot_reliability(bins: list[dict], path: Any, title: str) -> Any:
    """The reliability diagram: accuracy against confidence per bin (the diagonal is perfect calibration), with
    how many rows each bin holds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmtune.files import replace_file

    fig = Figure(figsize=(5.2, 5.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    used = [b for b in bins if b["count"]]
    centres = [(b["low"] + b["high"]) / 2 for b in used]
    width = bins[0]["high"] - bins[0]["low"]
    ax.bar(centres, [b["accuracy"] for b in used], width=width * 0.9, color="#4c78a8", alpha=0.8, label="accuracy")
    ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o", color="#e45756", markersize=4,
            label="mean confidence")
    for c, b in zip(centres, used):
        ax.text(c, min(b["accuracy"] + 0.02, 0.97), str(b["count"]), ha="center", fontsize=6, color="#333")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (predicted class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    replace_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
