"""Command line: parse, load config, call the API; heavy imports stay inside the commands."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fine-tune pretrained language models on your data.")
# Under torchrun / accelerate launch only the first process talks; the others stay quiet.
MAIN_PROCESS = os.environ.get("RANK", "0") == "0"
# Off a terminal (a log file, a pipe) rich would cut tables to 80 columns: give them room unless COLUMNS says otherwise.
console = Console(stderr=True, quiet=not MAIN_PROCESS,
                  width=None if (sys.stderr and sys.stderr.isatty()) or "COLUMNS" in os.environ else 160)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    logger = logging.getLogger("lmtune")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO if MAIN_PROCESS else logging.ERROR)
    logger.propagate = False
    for noisy in ("transformers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def _fail(err: Exception) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)  # brackets in it are text
    raise typer.Exit(1)


def _user_errors() -> tuple[type[Exception], ...]:
    from lmtune.config import ConfigError
    from lmtune.data import DataError
    from lmtune.models import ModelError
    from lmtune.training.checkpoint import CheckpointError
    from lmtune.training.guard import DivergedError

    return (ConfigError, DataError, ModelError, FileNotFoundError, FileExistsError, ValueError, DivergedError,
            CheckpointError)


# A run folder is data: what its model may do on loading is the caller's to allow, never its config's.
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help="Let code shipped in the run's model folder run "
                                 "(a run folder's own config can never allow it).")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Allow pickled (.bin) weights, which can run code "
                            "(a run folder's own config can never allow it).")


def _interrupted(err: KeyboardInterrupt) -> None:
    """Ctrl-C: one line saying what is kept and how to go on, exit status 130 (as a shell reports SIGINT)."""
    from rich.markup import escape

    console.print(f"[bold yellow]{escape(str(err) or 'interrupted')}[/]", highlight=False)
    raise typer.Exit(130)


def _metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    # One level of nesting is shown too (an instruct run's `generation` scores as generation/accuracy ...).
    flat = {**metrics, **{f"{key}/{k}": v for key, inner in metrics.items() if isinstance(inner, dict)
                          for k, v in inner.items()}}
    for key, value in flat.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


@app.command()
def train(config: Path = typer.Argument(..., help="Run config (YAML)."),
          overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.lr=3e-5"),
          resume: bool = typer.Option(False, "--resume", help="Continue the latest unfinished run of this config."),
          seeds: str = typer.Option("", "--seeds", help="Train once per seed: a count (3 = seeds 1,2,3) or "
                                    "comma-separated seeds; reports mean, std, min and max (sets train.seeds)."),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Fine-tune a model as the config says; writes a run directory."""
    _setup_logging(verbose)
    from lmtune.config import load_config
    from lmtune.run import train as run_train
    from lmtune.seeds import parse_seeds

    try:
        if seeds:
            overrides = [*(overrides or []), f"train.seeds={json.dumps(parse_seeds(seeds))}"]
        cfg = load_config(config, overrides)
        console.rule("resolved config")
        console.print(cfg.to_yaml(), highlight=False, markup=False)
        result = run_train(config, overrides, resume=resume)
    except _user_errors() as err:
        _fail(err)
    except KeyboardInterrupt as err:
        _interrupted(err)
    m = result.metrics
    if "runs" in m:  # several seeds
        console.print((result.run_dir / "seeds.md").read_text(encoding="utf-8"), markup=False, highlight=False)
        console.print(f"{len(m['runs'])} seeds; runs, seeds.json and seeds.md in [bold]{result.run_dir}[/]")
        return
    for split in ("validation", "test"):
        if split in m:
            console.print(_metrics_table(f"{split} ({m['data']['rows'].get(split, '?')} rows)", m[split]))
            base = m[split].get("majority_baseline")
            if base:
                console.print(f"  majority-class baseline ({base['label']!r} always): accuracy "
                              f"{base['accuracy']:.4f}, macro-F1 {base['macro_f1']:.4f}", highlight=False)
    console.print(f"trained {m['params']['trainable']:,} of {m['params']['total']:,} parameters in "
                  f"{m['train_seconds']:.1f} s; run directory: [bold]{result.run_dir}[/]")


@app.command()
def validate(config: Path = typer.Argument(..., help="Run config (YAML)."),
             overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides.")) -> None:
    """Check the config and the data (every row) without training."""
    _setup_logging()
    from lmtune.config import load_config
    from lmtune.preflight import check_setup

    try:
        cfg = load_config(config, overrides)
        console.print(cfg.to_yaml(), highlight=False, markup=False)
        # As train does first: the model's config.json and tokenizer against the config (no weights).
        _, report = check_setup(cfg).task.load_splits(cfg.train.seed)
    except _user_errors() as err:
        _fail(err)
    table = Table(title="data")
    for column in ("split", "rows", "skipped rows", "overlap with train"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, rows in report["rows"].items():
        table.add_row(split, str(rows), str(report["skipped_rows"].get(split, 0)),
                      str(report.get("overlap_with_train", {}).get(split, "")))
    console.print(table)
    if report.get("labels"):
        console.print(f"labels: {', '.join(map(str, report['labels']))}")
    console.print("[green]config and data are valid[/]")


def _read_inputs(path: str, column: str = "text") -> list[Any]:
    """Inputs for predict: JSONL/JSON/CSV/TSV rows (dicts), or plain text lines (file or stdin), every line one
    input, blank ones too (the final line end makes no line)."""
    if path == "-" or Path(path).suffix in (".txt", ""):
        stdin = getattr(sys.stdin, "buffer", None) if path == "-" else None
        data = Path(path).read_bytes() if path != "-" else stdin.read() if stdin is not None else sys.stdin.read()
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        # Universal newlines (\r\n and \r end a line, as \n does: no \r is left on a text), on stdin as in a file;
        # not splitlines(): U+2028, form feeds ... end no line.
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return lines[:-1] if lines[-1] == "" else lines
    from lmtune.data import read_table

    file = Path(path)
    ds = read_table(file)  # fields other rows of the file have and this one lacks (None) are left out
    # Every CSV row has every column: an empty text field is empty text (an error record), not a missing field.
    kept = column if file.name.lower().removesuffix(".gz").endswith((".csv", ".tsv")) else None
    return [{k: "" if v is None else v for k, v in row.items() if k != "_row" and (v is not None or k == kept)}
            for row in ds]


def _write_outputs(path: str, inputs: list[Any], preds: list[dict]) -> None:
    """Each input row with its prediction's fields; a field the input has already (a gold `label` column, say) keeps
    the input's value and the prediction's is written as `predicted_<field>`."""
    rows, clashes = [], set()
    for given, pred in zip(inputs, preds):
        row = dict(given) if isinstance(given, dict) else {"text": given}
        clashes.update(k for k in pred if k in row)
        rows.append({**row, **{f"predicted_{k}" if k in row else k: v for k, v in pred.items()}})
    if clashes := sorted(clashes):
        console.print(f"[yellow]the input has columns named like prediction fields ({', '.join(clashes)}): "
                      f"predictions written as {', '.join('predicted_' + k for k in clashes)}[/yellow]")
    if path == "-":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix in (".csv", ".tsv"):
        import pandas as pd

        flat = [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows]
        pd.DataFrame(flat).to_csv(file, index=False, sep="\t" if file.suffix == ".tsv" else ",")
    else:
        file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@app.command()
def predict(run: Path = typer.Argument(..., help="Run directory."),
            input: str = typer.Option("-", "--input", "-i", help="JSONL/CSV/TSV/JSON file, text lines, or - for stdin."),
            output: str = typer.Option("-", "--output", "-o", help="Output file (.jsonl/.csv/.tsv) or - for stdout."),
            text_column: Optional[str] = typer.Option(None, help="Input column holding the text (default: "
                                                      "the run's data.text_column, else 'text')."),
            trust_remote_code: bool = TRUST_REMOTE_CODE, allow_pickle: bool = ALLOW_PICKLE) -> None:
    """Predict with a trained run for every input row."""
    _setup_logging()
    from lmtune.data import DataError
    from lmtune.run import load

    try:
        predictor = load(run, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        column = text_column or predictor.session.cfg.data.text_column
        pair = predictor.session.cfg.data.text_pair_column
        inputs = _read_inputs(input, column)
        if text_column:  # asked for by name: a row without it is an error naming it, not a missing `text`
            for row, record in enumerate(inputs, 1):
                if isinstance(record, dict) and text_column not in record:
                    raise DataError(str(input), f"no {text_column!r} field (--text-column); fields found: "
                                    f"{', '.join(record) or 'none'}", row=row)
        # A row without the text goes to the task as it is: NER takes pre-tokenized {"tokens": [...]} rows (with
        # the text beside them: kept).
        records = [{**i, "text": i[column], **({"text_pair": i.get(pair)} if pair else {})}
                   if isinstance(i, dict) and column in i else i for i in inputs]
        # An empty or blank text gets an error record in its place (every input its own output line, in order); the
        # others are predicted together, a problem with one of them named by its input row.
        texts = [r.get("text") if isinstance(r, dict) and "tokens" not in r else r for r in records]
        empty = [isinstance(text, str) and not text.strip() for text in texts]
        rows = [i for i, e in enumerate(empty, 1) if not e]  # the input row of each record predicted
        try:
            found = iter(predictor.predict([records[i - 1] for i in rows]) if rows else [])
        except DataError as err:
            if err.row is None or not 0 < err.row <= len(rows):
                raise
            raise DataError(err.path, err.message, row=rows[err.row - 1], field=err.field, unit=err.unit) from None
        preds = [{"error": "empty text: nothing to predict"} if e else next(found) for e in empty]
    except (*_user_errors(), KeyError) as err:
        _fail(err)
    _write_outputs(output, inputs, preds)
    if any(empty):
        console.print(f"{sum(empty)} of {len(preds)} inputs have empty text: an error record each, in their place")
    if output != "-":
        console.print(f"{len(preds)} predictions written to {output}")


@app.command("eval")
def evaluate(run: Path = typer.Argument(..., help="Run directory."),
             data: Path = typer.Option(..., "--data", "-d", help="Labelled file in the training data's format."),
             output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the metrics as JSON here."),
             skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Drop rows that fail the data checks "
                                                "(counted in the log) instead of stopping at the first."),
             trust_remote_code: bool = TRUST_REMOTE_CODE, allow_pickle: bool = ALLOW_PICKLE) -> None:
    """Score a trained run on a labelled file."""
    _setup_logging()
    from lmtune.run import evaluate as run_evaluate

    try:
        metrics = run_evaluate(run, data, "skip" if skip_bad_rows else None, trust_remote_code=trust_remote_code,
                               allow_pickle=allow_pickle)
    except _user_errors() as err:
        _fail(err)
    console.print(_metrics_table(f"{data} ({metrics['rows']} rows)", metrics))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(metrics, indent=2), encoding="utf-8")


@app.command()
def compare(config: Path = typer.Argument(..., help="Run config (YAML)."),
            overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides for every run."),
            methods: str = typer.Option("head,lp_ft,full,lora,bitfit", "--methods", "-m",
                                        help="Comma-separated method names, each optionally with options: "
                                        "'full,lora(lr=5e-4 r=16),bitfit(lr=1e-3)'."),
            seeds: str = typer.Option("", "--seeds", help="Comma-separated seeds, or a count (e.g. 3); "
                                      "default: the config's seed."),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for runs and tables.")) -> None:
    """Run one config under several methods (and seeds); write a table (Markdown, CSV) and a chart."""
    _setup_logging()
    from lmtune.compare import compare as run_compare
    from lmtune.compare import parse_methods

    from lmtune.seeds import parse_seeds

    try:
        folder = run_compare(config, parse_methods(methods), parse_seeds(seeds) if seeds else None, overrides,
                             output)
    except _user_errors() as err:
        _fail(err)
    console.print((folder / "compare.md").read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(f"table, chart and runs in {folder}")


@app.command("inspect")
def inspect_data(config: Path = typer.Argument(..., help="Run config (YAML)."),
                 overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. model.name=..."),
                 output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for inspect.json and "
                                                       "the length plot (default: <output.dir>/<config name>-inspect).")
                 ) -> None:
    """Profile the data against the model's tokenizer: lengths, truncation, unknown tokens, labels, duplicates."""
    _setup_logging()
    from lmtune.inspect_data import inspect, tables

    try:
        folder, result = inspect(config, overrides, output)
    except _user_errors() as err:
        _fail(err)
    for table in tables(result):
        console.print(table)
    console.print(f"inspect.json and length_distribution.png in [bold]{folder}[/]")


@app.command("select")
def select_model(config: Path = typer.Argument(..., help="Run config (YAML): the task and data to choose a model for."),
                 overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides."),
                 candidates: str = typer.Option(..., "--candidates", "-c", help="Comma-separated built-in model "
                                                "names or local folders, e.g. minilm-l6,smollm2-135m,./my-model."),
                 sample: int = typer.Option(1000, "--sample", help="Training rows to assess on (stratified)."),
                 folds: int = typer.Option(5, "--folds", help="Cross-validation folds of the linear probe."),
                 output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for select.json "
                                                       "(default: <output.dir>/<config name>-select)."),
                 then_train: bool = typer.Option(False, "--then-train", help="Then train the config with the winner.")
                 ) -> None:
    """Rank candidate pretrained models for the task and data: tokenizer fit, linear probe, perplexity, cost."""
    _setup_logging()
    from lmtune.select import select, table

    names = [c.strip() for c in candidates.split(",") if c.strip()]
    try:
        result = select(config, names, overrides, sample=sample, folds=folds, output=output)
    except _user_errors() as err:
        _fail(err)
    console.print(table(result))
    console.print(result.recommendation, highlight=False, markup=False, soft_wrap=True)
    console.print(f"select.json in [bold]{result.folder}[/]")
    if then_train:
        if result.winner is None:
            _fail(ValueError("--then-train: no candidate could be assessed, nothing to train"))
        from lmtune.run import train as run_train

        try:
            trained = run_train(config, [*(overrides or []), f"model.name={result.winner}"])
        except _user_errors() as err:
            _fail(err)
        for split in ("validation", "test"):
            if split in trained.metrics:
                console.print(_metrics_table(f"{split} ({result.winner})", trained.metrics[split]))
        console.print(f"run directory: [bold]{trained.run_dir}[/]")


@app.command()
def search(config: Path = typer.Argument(..., help="Run config (YAML) with a `search:` section."),
           overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides for every trial."),
           space: Optional[Path] = typer.Option(None, "--space", help="YAML file holding the `search:` section."),
           trials: Optional[int] = typer.Option(None, "--trials", help="Finished trials to end with (overrides "
                                                "search.trials)."),
           timeout_minutes: Optional[float] = typer.Option(None, "--timeout-minutes", help="Time budget of this "
                                                           "invocation."),
           storage: Optional[str] = typer.Option(None, "--storage", help="Optuna RDB URL shared by several machines "
                                                 "(default: sqlite search.db in the output folder)."),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="Search folder (default: "
                                                 "<output.dir>/<output.name>, name <config name>-search by default)."),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Search hyperparameters with Optuna; re-running the same command resumes the search."""
    _setup_logging(verbose)
    from lmtune.search import search as run_search

    try:
        result = run_search(config, overrides, space=space, trials=trials, timeout_minutes=timeout_minutes,
                            storage=storage, output=output)
    except (*_user_errors(), KeyError) as err:
        _fail(err)
    except KeyboardInterrupt as err:  # Ctrl-C: one line saying which trial runs again, no traceback
        _interrupted(err)
    params = [k for k in result.rows[0] if "." in k] if result.rows else []
    table = Table(title=f"trials (validation {result.metric}, {result.direction})")
    for column in ("trial", "state", *params, result.metric, "seconds"):
        table.add_column(column, justify="left" if column == "state" else "right")
    for r in result.rows:
        value = r["value"] if r["state"] == "complete" else r["last_reported"]
        table.add_row(str(r["number"]), r["state"], *(_short(r.get(p)) for p in params), _short(value),
                      _short(r["seconds"]))
    console.print(table)
    if result.best is None:
        console.print("no trial completed yet")
    else:
        chosen = ", ".join(f"{p}={_short(result.best[p])}" for p in params)
        console.print(f"best: trial {result.best['number']}, {result.metric} {result.best['value']:.4f} ({chosen}); "
                      f"config: [bold]{result.folder / 'best.yaml'}[/]")
    console.print(f"trials table, plots and runs in {result.folder}")


def _short(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command("export")
def export_model(run: Path = typer.Argument(..., help="Run directory."),
                 output: Path = typer.Option(..., "--output", "-o", help="Folder to write the model to."),
                 merge: bool = typer.Option(True, "--merge/--no-merge",
                                            help="Merge adapters (LoRA ...) into the weights."),
                 overwrite: bool = typer.Option(False, "--overwrite",
                                                help="Replace the folder an earlier export wrote there."),
                 trust_remote_code: bool = TRUST_REMOTE_CODE, allow_pickle: bool = ALLOW_PICKLE) -> None:
    """Write a run's model as a plain Hugging Face folder (adapters merged)."""
    _setup_logging()
    from lmtune.run import export

    try:
        folder = export(run, output, merge=merge, overwrite=overwrite, trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle)
    except _user_errors() as err:
        _fail(err)
    console.print(f"model written to {folder}")


@app.command("ls")
def list_things(fields: bool = typer.Option(False, "--fields", help="Also list every config field.")) -> None:
    """List tasks, methods, built-in models and example configs."""
    from lmtune.config import SECTIONS
    from lmtune.models import BUILTIN_MODELS
    from lmtune.registry import METHODS, TASKS, load_builtins

    load_builtins()
    table = Table(title="lmtune")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("description")
    for kind, registry in (("task", TASKS), ("method", METHODS)):
        for name, obj in registry.items():
            table.add_row(kind, name, obj.Options.model_fields["name"].description or "")
    for name, (package, version, _) in BUILTIN_MODELS.items():
        table.add_row("model", name, f"from the package {package}=={version}")
    for path in sorted(EXAMPLES.glob("*.yaml")) if EXAMPLES.is_dir() else []:
        table.add_row("example", str(path.relative_to(EXAMPLES.parent)), _first_comment(path))
    console.print(table)
    if fields:
        from rich.markup import escape

        from lmtune.config import ReplayConfig
        from lmtune.search import ParamSpace, SearchConfig

        sections = {**SECTIONS, "data.replay": ReplayConfig, **{f"task ({n})": o.Options for n, o in TASKS.items()},
                    **{f"method ({n})": o.Options for n, o in METHODS.items()},
                    "search (lmtune search)": SearchConfig, "search.space.<field>": ParamSpace}
        for section, model in sections.items():
            t = Table(title=section)
            for column in ("field", "default", "description"):
                t.add_column(column)
            for name, field in model.model_fields.items():
                default = "(required)" if field.is_required() else repr(field.default)
                t.add_row(name, escape(default), escape(field.description or ""))  # "[low, high]" is no markup
            console.print(t)


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
