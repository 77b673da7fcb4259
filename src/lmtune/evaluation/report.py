"""report.html: one self-contained page (plots inlined, no script, nothing fetched) for a run, a several-seed run, a
compare or a search folder, written from the files the folder holds, so `lmtune report FOLDER` can write it again."""

from __future__ import annotations

import base64
import csv
import json
import os
from pathlib import Path
from typing import Any

from lmtune.split_names import eval_split_names, plot_stem

KINDS = {"metrics.json": "run", "seeds.json": "seeds", "runs.json": "compare", "trials.csv": "search"}


def folder_kind(folder: Path) -> str | None:
    """What lmtune folder `folder` is, by the files it holds: run, seeds, compare, search (None: none of them)."""
    return next((kind for name, kind in KINDS.items() if (folder / name).is_file()), None)


def write_report(folder: str | os.PathLike) -> Path:
    """Write `folder`/report.html for the run or study it holds; returns its path."""
    from lmtune.errors import FolderError
    from lmtune.files import write_text

    folder = Path(folder)
    kind = folder_kind(folder)
    if kind is None:
        raise FolderError(f"{folder} holds no finished run, seeds, compare or search (no metrics.json, seeds.json, "
                          "runs.json or trials.csv)")
    page = _run_page(folder) if kind == "run" else _study_page(folder, kind)
    write_text(folder / "report.html", page)
    return folder / "report.html"


def _render(template: str, **context: Any) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("lmtune.evaluation", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    return env.get_template(template).render(**context)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 10 ** digits or (value and abs(value) < 1e-3) \
            else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _image(path: Path) -> str | None:
    """A PNG as a data: URI (the page holds its pictures), None where there is none."""
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode('ascii')}" if path.is_file() else None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _markdown(text: str) -> str:
    """A model card's body (its YAML header dropped) as HTML; raw HTML in it is shown as text, headings one level
    down (the page has its own title)."""
    from huggingface_hub import ModelCard
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(ModelCard(text, ignore_metadata_errors=True).text)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + 1)}"
    return md.renderer.render(tokens, md.options, {})


def _scalars(split: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in split.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _run_page(folder: Path) -> str:
    metrics = _read_json(folder / "metrics.json")
    card = folder / "model" / "README.md"
    splits = []
    for name in eval_split_names(metrics):
        split = metrics.get(name)
        if not split:
            continue
        classes = split.get("per_class") or split.get("per_type") or split.get("per_target") or {}
        kind = "entity type" if "per_type" in split else "target" if "per_target" in split else "class"
        splits.append({"name": name, "scalars": _scalars(split), "baseline": split.get("majority_baseline"),
                       "classes": classes, "class_kind": kind,
                       "confusion": _image(folder / "plots" / f"confusion_{plot_stem(name)}.png"),
                       "reliability": _image(folder / "plots" / f"reliability_{plot_stem(name)}.png")})
    overfitting = metrics.get("overfitting")
    data = metrics.get("data", {})
    return _render(
        "run.html.j2", title=metrics.get("run", folder.name), metrics=metrics, splits=splits,
        headline=_headline(metrics), card=_markdown(card.read_text(encoding="utf-8")) if card.is_file() else None,
        curves=_image(folder / "plots" / "learning_curves.png"),
        overfitting=overfitting, overfitting_plot=_image(folder / "plots" / "overfitting.png"),
        data_rows=[{"split": s, "rows": n, "skipped": data.get("skipped_rows", {}).get(s),
                    "overlap": data.get("overlap_with_train", {}).get(s)} for s, n in data.get("rows", {}).items()],
        forgetting={k: v for k, v in (metrics.get("forgetting") or {}).items() if not isinstance(v, dict)},
        calibration=metrics.get("calibration"),
        generation=(metrics.get("test") or {}).get("generation"),
        mistakes=_read_json(folder / "mistakes.json") or {})


def _headline(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The selection metric on each split, beside what always answering the majority class scores."""
    metric = (metrics.get("selection") or {}).get("metric", "")
    out = []
    for split in eval_split_names(metrics):
        value = (metrics.get(split) or {}).get(metric)
        if isinstance(value, (int, float)):
            base = (metrics.get(split) or {}).get("majority_baseline") or {}
            out.append({"label": f"{split} {metric}", "value": value, "baseline": base.get(metric)})
    return out


def _study_page(folder: Path, kind: str) -> str:
    """A compare, search or several-seed folder: its table, its plots, a link to each run's own report."""
    tables, images, runs = [], [], []
    if kind == "compare":
        rows = _read_json(folder / "runs.json") or []
        table = _read_csv(folder / "compare.csv")
        tables.append(("Methods (mean over seeds)", table))
        tables.append(("Every run", [{k: v for k, v in r.items() if k != "run"} for r in rows]))
        images.append(("Comparison", _image(folder / "compare.png")))
        runs = [(f"{r['method']}, seed {r['seed']}", Path(r["run"])) for r in rows]
        intro = f"{len(table)} method(s), {len(rows)} run(s)."
    elif kind == "seeds":
        summary = _read_json(folder / "seeds.json")
        tables.append(("Over the seeds", [{"split": split, "metric": key, **values}
                                          for split in [*eval_split_names(summary), "forgetting"]
                                          for key, values in summary.get(split, {}).items()]))
        runs = [(f"seed {seed}", Path(path)) for seed, path in summary.get("runs", {}).items()]
        intro = f"{len(runs)} seed(s): every scalar metric described over them."
    else:
        rows = _read_csv(folder / "trials.csv")
        tables.append(("Trials", [{k: v for k, v in r.items() if k != "run_dir"} for r in rows]))
        images += [("Search history", _image(folder / "plots" / "history.png")),
                   ("Parameter importances", _image(folder / "plots" / "importances.png"))]
        runs = [(f"trial {r['number']} ({r['state']})", Path(r["run_dir"])) for r in rows if r.get("run_dir")]
        best = folder / "best.yaml"
        intro = f"{len(rows)} trial(s)." + (f" The best configuration is in {best.name}." if best.is_file() else "")
    runs = [(label, _located(folder, path)) for label, path in runs]
    links = [{"label": label, "href": _href(folder, path), "headline": _headline(_read_json(path / "metrics.json")
                                                                                   or {})}
             for label, path in runs]
    return _render("study.html.j2", title=f"{kind}: {folder.name}", kind=kind, intro=intro,
                   tables=[(caption, rows) for caption, rows in tables if rows],
                   images=[(caption, uri) for caption, uri in images if uri], runs=links)


def _located(folder: Path, run: Path) -> Path:
    """A run of the study where it is now: as recorded (absolute paths), else by its name inside the study's folder
    (a study folder moved or copied elsewhere keeps its runs inside it: directly, or under trials/)."""
    if run.is_dir():
        return run
    for inside in (folder / run.name, folder / "trials" / run.name):
        if inside.is_dir():
            return inside
    return run


def _href(folder: Path, run: Path) -> str | None:
    """A relative link from the study's page to a run's own report, where the run wrote one."""
    page = run / "report.html"
    return Path(os.path.relpath(page, folder)).as_posix() if page.is_file() else None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
