"""What a search leaves behind besides its runs: the trials table (CSV, Markdown) and its two plots."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("lmtune")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_tables(rows: list[dict[str, Any]], params: list[str], folder: Path, metric: str) -> None:
    """trials.csv (every field) and trials.md (number, state, parameters, metric, seconds[, GPU memory])."""
    from lmtune.files import replace_file

    columns = list(dict.fromkeys(key for row in rows for key in row))
    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    replace_file(folder / "trials.csv", write_csv)
    memory = any(r.get("cuda_memory_mb") is not None for r in rows)
    head = ["trial", "state", *params, f"validation {metric}", "seconds"] + (["GPU memory after (MB)"] if memory else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        value = r["value"] if r["state"] == "complete" else r["last_reported"]
        shown = _cell(value) + (f" (at eval {r['evaluations']})" if r["state"] == "pruned" and value is not None else "")
        cells = [str(r["number"]), r["state"], *(_cell(r.get(p)) for p in params), shown, _cell(r["seconds"])]
        lines.append("| " + " | ".join(cells + ([_cell(r["cuda_memory_mb"])] if memory else [])) + " |")
    replace_file(folder / "trials.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_history(rows: list[dict[str, Any]], path: Path, metric: str, direction: str) -> Path | None:
    """Each trial's validation metric (pruned trials: their last report, greyed) and the best so far."""
    from lmtune.files import replace_file

    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    pruned = [r for r in rows if r["state"] == "pruned" and r["last_reported"] is not None]
    if not done and not pruned:
        return None
    fig, ax = _figure(7.0, 4.2)
    if done:
        ax.plot([r["number"] for r in done], [r["value"] for r in done], "o", color="tab:blue", label="complete")
        best, line = None, []
        for r in sorted(done, key=lambda r: r["number"]):
            if best is None or (r["value"] > best if direction == "maximize" else r["value"] < best):
                best = r["value"]
            line.append((r["number"], best))
        ax.step(*zip(*line), where="post", color="tab:red", label="best so far")
    if pruned:
        ax.plot([r["number"] for r in pruned], [r["last_reported"] for r in pruned], "x", color="grey",
                label="pruned (last evaluation)")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"optimisation history ({direction})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    replace_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def plot_importances(study: Any, path: Path) -> Path | None:
    """Parameter importances (Optuna's fANOVA) from the complete trials; skipped, with a log line, when there
    are fewer than two or Optuna cannot compute them (e.g. a parameter that never varied)."""
    import optuna

    from lmtune.files import replace_file

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        log.info("search: no importance plot: %d complete trial(s), need 2", len(complete))
        return None
    try:
        # fANOVA, as the axis label says (optuna 5's default is PED-ANOVA, which also splits a flat study's nothing)
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as err:
        log.info("search: no importance plot: %s", err)
        return None
    if not importances:
        return None
    names = list(importances)[::-1]  # most important on top
    fig, ax = _figure(7.0, 1.2 + 0.45 * len(names))
    ax.barh(names, [importances[n] for n in names], color="tab:purple")
    ax.set_xlabel("importance (share of the metric's variance)")
    ax.set_title(f"parameter importances ({len(complete)} complete trials)")
    ax.grid(axis="x", alpha=0.3)
    replace_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _short(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _params(result: Any) -> list[str]:
    return [k for k in result.rows[0] if "." in k] if result.rows else []


def console_table(result: Any) -> Any:
    """The trials as a rich table: parameters, state, the metric (the last reported value of an unfinished one)."""
    from rich.table import Table

    params = _params(result)
    table = Table(title=f"trials (validation {result.metric}, {result.direction})")
    for column in ("trial", "state", *params, result.metric, "seconds"):
        table.add_column(column, justify="left" if column == "state" else "right")
    for r in result.rows:
        value = r["value"] if r["state"] == "complete" else r["last_reported"]
        table.add_row(str(r["number"]), r["state"], *(_short(r.get(p)) for p in params), _short(value),
                      _short(r["seconds"]))
    return table


def console_summary(result: Any) -> str:
    """One line: the best trial, its parameters and the config that trains it (rich markup)."""
    if result.best is None:
        return "no trial completed yet"
    chosen = ", ".join(f"{p}={_short(result.best[p])}" for p in _params(result))
    return (f"best: trial {result.best['number']}, {result.metric} {result.best['value']:.4f} ({chosen}); "
            f"config: [bold]{result.folder / 'best.yaml'}[/]")
