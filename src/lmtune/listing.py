"""Console tables: what `lmtune ls` prints (tasks, methods, built-in models, example configs and with --fields every
config field), and a finished run's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from rich.table import Table
from rich.text import Text


def tables(examples: Path, fields: bool = False) -> Iterator[Table]:
    from lmtune.config import SECTIONS
    from lmtune.models import BUILTIN_MODELS
    from lmtune.methods import METHODS
    from lmtune.tasks import TASKS

    table = Table("kind", "name", "description", title="lmtune")
    for kind, registry in (("task", TASKS), ("method", METHODS)):
        for name, obj in registry.items():
            table.add_row(kind, name, obj.Options.model_fields["name"].description or "")
    for name, (package, version, _) in BUILTIN_MODELS.items():
        table.add_row("model", name, f"from the package {package}=={version}")
    for path in sorted(examples.glob("*.yaml")) if examples.is_dir() else []:
        table.add_row("example", str(path.relative_to(examples.parent)), _first_comment(path))
    yield table
    if fields:
        from rich.markup import escape

        from lmtune.config import ReplayConfig
        from lmtune.studies.search import ParamSpace, SearchConfig

        # (title, the prefix a field takes in an override, its model): fields as users write them, `train.lr`
        sections = [*((name, name, model) for name, model in SECTIONS.items()),
                    ("data.replay", "data.replay", ReplayConfig),
                    *((f"task: {n}", "task", o.Options) for n, o in TASKS.items()),
                    *((f"method: {n}", "method", o.Options) for n, o in METHODS.items()),
                    ("search (lmtune search)", "search", SearchConfig),
                    ("search.space.<field>", "search.space.<field>", ParamSpace)]
        for title, prefix, model in sections:
            t = Table("field", "default", "description", title=title)
            for name, field in model.model_fields.items():
                default = "(required)" if field.is_required() else repr(field.default)
                t.add_row(escape(f"{prefix}.{name}"), escape(default), escape(field.description or ""))  # "[a, b]"
            yield t


def _first_comment(path: Path) -> str:
    return next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.startswith("#")), "")


def metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    table = Table("metric", "value", title=title)
    table.columns[1].justify = "right"
    # One level of nesting is shown too (an instruct run's `generation` scores as generation/accuracy ...).
    flat = {**metrics, **{f"{key}/{k}": v for key, inner in metrics.items() if isinstance(inner, dict)
                          for k, v in inner.items()}}
    for key, value in flat.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def split_tables(m: dict[str, Any]) -> list[Any]:
    """A finished run's metrics: a table per evaluated split (validation, each test set), each with its baseline."""
    from lmtune.split_names import eval_split_names

    out: list[Any] = []
    for split in eval_split_names(m):
        named = m["data"].get("test_sets", {}).get(split)
        title = f"{split}{f' ({named})' if named and named != split.partition(':')[2] else ''}"
        out.append(metrics_table(f"{title} ({m['data']['rows'].get(split, '?')} rows)", m[split]))
        if base := m[split].get("majority_baseline"):
            out.append(Text(f"  majority-class baseline ({base['label']!r} always): accuracy "  # a label: no markup
                            f"{base['accuracy']:.4f}, macro-F1 {base['macro_f1']:.4f}"))
    return out
