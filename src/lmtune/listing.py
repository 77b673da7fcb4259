"""What `lmtune ls` prints: tasks, methods, built-in models, example configs and (--fields) every config field."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from rich.table import Table


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
