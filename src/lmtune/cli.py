"""Command line: parse, load config, call the API; heavy imports stay inside the commands."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

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
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()


def _fail(err: Exception) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)  # brackets in it are text
    raise typer.Exit(1)


def _user_errors() -> tuple[type[Exception], ...]:
    from lmtune.errors import USER_ERRORS

    return USER_ERRORS


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


@app.command()
def train(config: Path = typer.Argument(..., help="Run config (YAML)."),
          overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.lr=3e-5"),
          resume: bool = typer.Option(False, "--resume", help="Continue the latest unfinished run of this config."),
          seeds: str = typer.Option("", "--seeds", help="Train once per seed: a count (3 = seeds 1,2,3) or "
                                    "comma-separated seeds; reports mean, std, min and max (sets train.seeds)."),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Fine-tune a model as the config says; writes a run directory."""
    from lmtune import timing

    timing.process_started = timing.process_start_time()  # start-up counts in the run's phase_seconds
    _setup_logging(verbose)
    from lmtune import run
    from lmtune.config import load_config
    from lmtune.listing import split_tables
    from lmtune.studies.seeds import parse_seeds, train_seeds

    try:
        if seeds:
            overrides = [*(overrides or []), f"train.seeds={json.dumps(parse_seeds(seeds))}"]
        cfg = load_config(config, overrides)  # parsed once, printed, then trained as it is
        console.rule("resolved config")
        console.print(cfg.to_yaml(), highlight=False, markup=False)
        if cfg.train.seeds:
            result = train_seeds(cfg, config.stem, resume=resume)
        else:
            result = run.train(cfg, resume=resume, stem=config.stem)
    except _user_errors() as err:
        _fail(err)
    except KeyboardInterrupt as err:
        _interrupted(err)
    m = result.metrics
    if "runs" in m:  # several seeds
        console.print((result.run_dir / "seeds.md").read_text(encoding="utf-8"), markup=False, highlight=False)
        console.print(f"{len(m['runs'])} seeds; runs, seeds.json and seeds.md in [bold]{result.run_dir}[/]")
        return
    for table in split_tables(m):
        console.print(table, highlight=False)
    console.print(f"trained {m['params']['trainable']:,} of {m['params']['total']:,} parameters in "
                  f"{m['train_seconds']:.1f} s; run directory: [bold]{result.run_dir}[/]")
    if MAIN_PROCESS and result.phases is not None:
        from lmtune.timing import record_phases

        result.phases.lap("summary")
        record_phases(result.run_dir, m, result.phases)
        console.print(f"whole run {m['phase_seconds']['total']:.1f} s: {result.phases.line()}", highlight=False)


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
        console.print(f"labels: {', '.join(map(str, report['labels']))}", markup=False, highlight=False)
    console.print("[green]config and data are valid[/]")


@app.command()
def predict(run: Path = typer.Argument(..., help="Run directory."),
            input: str = typer.Option("-", "--input", "-i", help="JSONL/CSV/TSV/JSON file, text lines, or - for stdin."),
            output: str = typer.Option("-", "--output", "-o", help="Output file (.jsonl/.csv/.tsv, each optionally .gz) or - for stdout."),
            text_column: Optional[str] = typer.Option(None, help="Input column holding the text (default: "
                                                      "the run's data.text_column, else 'text')."),
            trust_remote_code: bool = TRUST_REMOTE_CODE, allow_pickle: bool = ALLOW_PICKLE) -> None:
    """Predict with a trained run for every input row."""
    _setup_logging()
    from lmtune.predict import check_output_path, load, predict_rows, read_inputs, write_outputs

    try:
        if output != "-":
            check_output_path(output)  # before the model loads and predicts
        predictor = load(run, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        inputs = read_inputs(input, text_column or predictor.session.cfg.data.text_column)
        preds, empty = predict_rows(predictor, inputs, input, text_column)
        clashes = write_outputs(output, inputs, preds)
    except (*_user_errors(), KeyError, OSError) as err:
        _fail(err)
    if clashes:
        console.print(f"[yellow]the input has columns named like prediction fields ({', '.join(clashes)}): "
                      f"predictions written as {', '.join('predicted_' + k for k in clashes)}[/yellow]")
    if empty:
        console.print(f"{empty} of {len(preds)} inputs have empty text: an error record each, in their place")
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
    from lmtune.listing import metrics_table
    from lmtune.predict import evaluate as run_evaluate

    from lmtune.files import write_text
    from lmtune.predict import check_output_path
    from lmtune.training.logs import finite_json

    try:
        if output:
            check_output_path(str(output))  # before the model loads and scores
        metrics = run_evaluate(run, data, "skip" if skip_bad_rows else None, trust_remote_code=trust_remote_code,
                               allow_pickle=allow_pickle)
        console.print(metrics_table(f"{data} ({metrics['rows']} rows)", metrics))
        if output:
            write_text(output, json.dumps(finite_json(metrics), indent=2, allow_nan=False))
    except (*_user_errors(), OSError) as err:
        _fail(err)


@app.command()
def compare(config: Path = typer.Argument(..., help="Run config (YAML)."),
            overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides for every run."),
            methods: str = typer.Option("head,lp_ft,full,lora,bitfit", "--methods", "-m",
                                        help="Comma-separated method names, each optionally with options: "
                                        "'full,lora(lr=5e-4 r=16),bitfit(lr=1e-3)'; a dotted key sets a config "
                                        "value for that method's runs: 'full(data.replay.ratio=0.2)'."),
            seeds: str = typer.Option("", "--seeds", help="Comma-separated seeds, or a count (e.g. 3); "
                                      "default: the config's seed."),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for runs and tables.")) -> None:
    """Run one config under several methods (and seeds); write a table (Markdown, CSV) and a chart."""
    _setup_logging()
    from lmtune.studies.compare import compare as run_compare
    from lmtune.studies.compare import parse_methods

    from lmtune.studies.seeds import parse_seeds

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
    from lmtune.studies.inspect import inspect, tables

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
                                                "names, local folders or Hub ids, e.g. minilm-l6,./my-model,org/name."),
                 sample: int = typer.Option(1000, "--sample", help="Training rows to assess on (stratified)."),
                 folds: int = typer.Option(5, "--folds", help="Cross-validation folds of the linear probe."),
                 output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for select.json "
                                                       "(default: <output.dir>/<config name>-select)."),
                 then_train: bool = typer.Option(False, "--then-train", help="Then train the config with the winner.")
                 ) -> None:
    """Rank candidate pretrained models for the task and data: tokenizer fit, linear probe, perplexity, cost."""
    _setup_logging()
    from lmtune.listing import split_tables
    from lmtune.studies.select import select, table

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
        from lmtune import train as run_train

        try:
            trained = run_train(config, [*(overrides or []), f"model.name={result.winner}"])
        except _user_errors() as err:
            _fail(err)
        for shown in split_tables(trained.metrics):
            console.print(shown, highlight=False)
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
    from lmtune.studies.search import search as run_search

    try:
        result = run_search(config, overrides, space=space, trials=trials, timeout_minutes=timeout_minutes,
                            storage=storage, output=output)
    except (*_user_errors(), KeyError) as err:
        _fail(err)
    except KeyboardInterrupt as err:  # Ctrl-C: one line saying which trial runs again, no traceback
        _interrupted(err)
    from lmtune.studies.report import console_summary, console_table

    console.print(console_table(result))
    console.print(console_summary(result), highlight=False)
    console.print(f"trials table, plots and runs in {result.folder}")


@app.command("export")
def export_model(run: Path = typer.Argument(..., help="Run directory."),
                 output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder to write the model to "
                                                       "(default: <run>-hf, or <run>-onnx, beside the run)."),
                 format: str = typer.Option("hf", "--format", help="hf: a plain Hugging Face folder; onnx: ONNX for "
                                            "onnxruntime (classification, NER, QA), checked against PyTorch."),
                 quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: dynamic int8 weights (onnx)."),
                 merge: bool = typer.Option(True, "--merge/--no-merge",
                                            help="Merge adapters (LoRA ...) into the weights."),
                 overwrite: bool = typer.Option(False, "--overwrite",
                                                help="Replace the folder an earlier export wrote there."),
                 trust_remote_code: bool = TRUST_REMOTE_CODE, allow_pickle: bool = ALLOW_PICKLE) -> None:
    """Write a run's model as a plain Hugging Face folder (adapters merged) or as ONNX."""
    _setup_logging()
    from lmtune.predict import export

    try:
        folder = export(run, output, merge=merge, overwrite=overwrite, format=format, quantize=quantize,
                        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    except (*_user_errors(), ValueError) as err:
        _fail(err)
    console.print(f"model written to {folder}")


@app.command()
def serve(run: Path = typer.Argument(..., help="Run directory or ONNX export."),
          host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port"),
          device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (an ONNX export runs on the CPU)."),
          max_batch_size: int = typer.Option(32, "--max-batch-size", help="Inputs in one forward pass."),
          max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long a pass waits for more inputs."),
          max_inputs: int = typer.Option(256, "--max-inputs", help="Inputs in one request."),
          max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens",
                                                       help="Decoders: the most a request may ask for."),
          trust_remote_code: bool = TRUST_REMOTE_CODE, allow_pickle: bool = ALLOW_PICKLE) -> None:
    """Serve a run over HTTP: POST /v1/predict, GET /health, GET /v1/info, docs at /docs."""
    _setup_logging()
    from lmtune.serving.server import Limits, serve as run_server

    limits = Limits(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_inputs=max_inputs,
                    max_new_tokens=max_new_tokens)
    try:
        console.print(f"serving {run} on http://{host}:{port} (docs: http://{host}:{port}/docs)")
        run_server(run, host, port, limits, device=device, trust_remote_code=trust_remote_code,
                   allow_pickle=allow_pickle)
    except (*_user_errors(), FileNotFoundError, ValueError) as err:
        _fail(err)


@app.command()
def report(folder: Path = typer.Argument(..., help="A run, several-seed, compare or search folder.")) -> None:
    """Write the folder's report.html again from the files it holds (runs and studies write it when they end)."""
    _setup_logging()
    from lmtune.evaluation.report import write_report

    try:
        page = write_report(folder)
    except _user_errors() as err:
        _fail(err)
    console.print(f"report written to {page}")


@app.command("ls")
def list_things(fields: bool = typer.Option(False, "--fields", help="Also list every config field.")) -> None:
    """List tasks, methods, built-in models and example configs."""
    from lmtune.listing import tables

    for table in tables(EXAMPLES, fields):
        console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
