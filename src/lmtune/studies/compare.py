"""`lmtune compare`: one config under several methods (and seeds), summarised as a table and a chart."""

from __future__ import annotations

import csv
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from lmtune.config import ConfigError, load_config
from lmtune.split_names import eval_split_names
from lmtune.preflight import check_setup
from lmtune.folders import claim
from lmtune.rundir import refuse_run_folder
from lmtune.studies.seeds import apply, describe, shared_by_runs
from lmtune.training.logs import finite_json

log = logging.getLogger("lmtune")


def parse_methods(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """"full,lora(lr=5e-4 r=16),bitfit" -> [("full", {}), ("lora", {"lr": 5e-4, "r": 16}), ("bitfit", {})]; options
    in brackets are separated by spaces or commas; a dotted key (`data.replay.ratio=0.2`) is a config value for that
    method's runs. Anything else is refused, naming the part that does not read."""
    import re

    from lmtune.config_read import parse_value

    out = []
    for item in re.split(r",(?![^()]*\))", spec):  # commas outside brackets separate methods
        match = re.fullmatch(r"\s*([\w-]+)\s*(?:\(([^()]*)\))?\s*", item)
        if match is None:
            raise ValueError(f"--methods {spec!r}: cannot read {item.strip()!r} (expected name or "
                             "name(key=value ...), methods separated by commas)")
        options = {}
        for option in re.split(r"[\s,]+(?![^\[{]*[\]}])", (match.group(2) or "").strip()):  # not inside [..] {..}
            if not option:
                continue
            key, sep, value = option.partition("=")
            if not sep:
                raise ValueError(f"--methods: {option!r} in {item.strip()!r} is not key=value")
            try:
                options[key] = parse_value(value)
            except Exception as err:  # noqa: BLE001 - YAML's parser errors: say which option
                raise ValueError(f"--methods: cannot read the value of {option!r} in {item.strip()!r}") from err
        out.append((match.group(1), options))
    labels = [_label(name, options) for name, options in out]
    if len(set(labels)) != len(labels):  # the same runs twice, into the same folders, counted as more seeds
        twice = next(label for label in labels if labels.count(label) > 1)
        raise ValueError(f"--methods {spec!r}: {twice} is given twice")
    return out


def _label(name: str, options: dict[str, Any]) -> str:
    return name + (f"({' '.join(f'{k}={v}' for k, v in options.items())})" if options else "")


def _method_section(base: dict[str, Any], name: str, options: dict[str, Any]) -> dict[str, Any]:
    # The config's own method options apply only to that method; any other method runs on its defaults.
    return {**(base if base.get("name") == name else {"name": name}), **options}


def _with_settings(raw: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A dotted key among a method's options sets that config value for the method's runs (e.g.
    `full(data.replay.path=general.txt)`: replay beside the methods, in one table); the rest are method options."""
    for key, value in options.items():
        if "." in key:
            *path, last = key.split(".")
            node = raw
            for part in path:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[last] = value
    return {key: value for key, value in options.items() if "." not in key}


# metrics.json's forgetting figures shown as compare columns
FORGETTING = {"reference_probe_drop": "reference probe drop", "relative_change": "general-text perplexity change",
              "general_chat_loss_change": "general-chat loss change"}


def _extra(column: str) -> bool:
    return column.startswith("test:") or column in FORGETTING.values()


def _summary(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
    split = "test" if "test" in metrics else "validation"
    memory = [s.get("peak_memory_mb") for s in metrics.get("stages", {}).values() if s.get("peak_memory_mb")]
    # the other named test sets (e.g. out-of-domain) as columns of their own
    extras = {f"{s} {metric}": metrics[s].get(metric) for s in eval_split_names(metrics) if s.startswith("test:")}
    forgetting = metrics.get("forgetting") or {}  # what the run lost, where it was measured
    extras.update({column: forgetting[key] for key, column in FORGETTING.items() if key in forgetting})
    return {"split": split, "metric": metrics.get(split, {}).get(metric), **extras,
            "trainable_params": metrics["params"]["trainable"], "total_params": metrics["params"]["total"],
            "train_seconds": metrics["train_seconds"], "peak_memory_mb": max(memory) if memory else None}


def compare(config: str | Path, methods: list[tuple[str, dict[str, Any]]], seeds: list[int] | None = None,
            overrides: list[str] | None = None, output: str | Path | None = None) -> Path:
    """Train `config` once per method and seed; write compare.md, compare.csv, compare.png and runs.json."""
    from lmtune.evaluation.report import write_report
    from lmtune.run import train

    base = load_config(config, overrides)
    metric = base.eval.metric  # else the task's own (a method's eval.metric changes what it selects by, not the column)
    folder = Path(output or Path(base.output.dir) / (base.output.name
                                                     or f"compare-{Path(config).stem}-{datetime.now():%Y%m%d-%H%M%S}"))
    refuse_run_folder(folder, "compare")
    seeds = seeds or base.train.seeds or [base.train.seed]
    plan, errors = [], []
    shared = shared_by_runs(base)
    for method, options in methods:  # every run's config checked before the first one trains
        for seed in seeds:
            raw = apply(base.model_dump(mode="json"), shared)
            raw["method"] = _method_section(raw["method"], method, _with_settings(raw, options))
            raw["train"].update(seed=seed, seeds=None)  # each run one seed: the table spreads them
            run_name = f"{method}-{len(plan)}-seed{seed}" if options else f"{method}-seed{seed}"
            raw["output"].update(dir=str(folder), name=run_name, overwrite=True)
            try:
                checked = load_config(raw)
                if seed == seeds[0]:  # what needs the tokenizer and the model's config (windows, probes)
                    metric = metric or check_setup(checked).task.default_metric
            except ConfigError as err:
                errors.append(f"{_label(method, options)}: {err}")
            plan.append((_label(method, options), seed, raw))
    if errors:
        raise ConfigError("compare: " + "\n".join(dict.fromkeys(errors)))
    # Made (or taken over: output.overwrite trains into it again) and locked only now that every run checked out.
    lock = claim(folder, "compare", overwrite=base.output.overwrite, clear=False)
    try:
        rows: list[dict[str, Any]] = []
        for label, seed, raw in plan:
            log.info("compare: %s, seed %d", label, seed)
            result = train(raw)
            rows.append({"method": label, "seed": seed, "run": str(result.run_dir),
                         **_summary(result.metrics, metric)})
        (folder / "runs.json").write_text(json.dumps(finite_json(rows), indent=2, allow_nan=False), encoding="utf-8")
        table = aggregate(rows)
        write_table(table, folder, metric)
        plot_comparison(table, folder / "compare.png", metric)
        write_report(folder)
    finally:
        lock.release()
    return folder


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per method: mean and std (over seeds) of the metric and time; params and memory."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        values = [r["metric"] for r in mine if r["metric"] is not None]
        spread = describe(values) if values else None
        memory = [r["peak_memory_mb"] for r in mine if r["peak_memory_mb"] is not None]
        extras = {}
        for column in dict.fromkeys(c for r in mine for c in r if _extra(c)):
            found = [r[column] for r in mine if r.get(column) is not None]
            extras[f"{column} mean"] = describe(found)["mean"] if found else None
            extras[f"{column} std"] = describe(found)["std"] if found else None
        out.append({"method": method, "seeds": len(mine), "split": mine[0]["split"],
                    "metric_mean": spread["mean"] if spread else None,
                    "metric_std": spread["std"] if spread else 0.0, **extras,
                    "trainable_params": mine[0]["trainable_params"], "total_params": mine[0]["total_params"],
                    "train_seconds_mean": describe([r["train_seconds"] for r in mine])["mean"],
                    "peak_memory_mb": max(memory) if memory else None})
    return out


def write_table(table: list[dict[str, Any]], folder: Path, metric: str) -> None:
    with (folder / "compare.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    extras = [c[:-len(" mean")] for c in table[0] if c.endswith(" mean") and c != "train_seconds_mean"]
    lines = [f"| method | {table[0]['split']} {metric} | {''.join(f'{c} | ' for c in extras)}trainable params | "
             "train time (s) | peak GPU memory (MB) |", "|---|---|" + "---|" * len(extras) + "---|---|---|"]

    def shown(mean: float | None, std: float | None, seeds: int) -> str:
        if mean is None:
            return "n/a"
        return f"{mean:.4f}" + (f" ± {std:.4f} ({seeds} seeds)" if seeds > 1 else "")

    for r in table:
        value = shown(r["metric_mean"], r["metric_std"], r["seeds"])
        more = "".join(f"{shown(r.get(f'{c} mean'), r.get(f'{c} std'), r['seeds'])} | " for c in extras)
        share = r["trainable_params"] / r["total_params"]
        memory = "—" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['method']} | {value} | {more}{r['trainable_params']:,} ({share:.1%}) | "
                     f"{r['train_seconds_mean']:.1f} | {memory} |")
    (folder / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_comparison(table: list[dict[str, Any]], path: Path, metric: str) -> Path:
    """One row per method, one panel per measure: metric (± std over seeds), trainable parameters (log scale),
    training time and, where measured (GPU runs), peak GPU memory. Horizontal bars keep long method labels
    such as `lora(lr=0.0005 r=16 alpha=32)` readable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmtune.files import replace_file

    names = [r["method"] for r in table]
    values = [r["metric_mean"] or 0.0 for r in table]
    spread = [r["metric_std"] if r["seeds"] > 1 else 0.0 for r in table]
    measures = [(f"{table[0]['split']} {metric}", values, "tab:blue"),
                ("trainable parameters", [r["trainable_params"] for r in table], "tab:orange"),
                ("training time (s)", [r["train_seconds_mean"] for r in table], "tab:green")]
    if any(r["peak_memory_mb"] is not None for r in table):
        measures.append(("peak GPU memory (MB)", [r["peak_memory_mb"] or 0.0 for r in table], "tab:red"))
    fig = Figure(figsize=(3.2 * len(measures) + 0.09 * max(map(len, names)), 1.3 + 0.42 * len(names)))
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, len(measures), sharey=True, squeeze=False)[0]
    rows = range(len(names))
    for ax, (title, data, color) in zip(panels, measures):
        ax.barh(rows, data, color=color, xerr=spread if data is values and any(spread) else None, capsize=4)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(list(rows), names)
    panels[0].invert_yaxis()  # first method on top, as in the table
    low = min(values)
    panels[0].set_xlim(max(0.0, low - 0.1 * (max(values) - low + 1e-9) - 0.05), None)
    panels[1].set_xscale("log")
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path
