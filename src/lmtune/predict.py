"""Loading a finished run back: predict, evaluate on a labelled file, export as a plain HF folder.

A run folder is data: the code and pickle permissions in its config.yaml are ignored; only the caller's
`trust_remote_code` / `allow_pickle` (command-line flags, keyword arguments) let its model run code."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

from lmtune.config import load_config
from lmtune.errors import DataError, FolderError
from lmtune.registry import TASKS
from lmtune.models import is_adapter
from lmtune.session import Session, make_accelerator
from lmtune.training.logs import finite_json

log = logging.getLogger("lmtune")


class Predictor:
    """A finished run loaded back for prediction and evaluation: `lmtune.load(run_dir)`.

    A run folder is data: the code and pickle permissions in its config.yaml are ignored; only the caller's
    `trust_remote_code` / `allow_pickle` (command-line flags, keyword arguments) let its model run code."""

    def __init__(self, run_dir: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                 device: str | None = None) -> None:
        from lmtune import models
        from lmtune.serving.onnx import CONFIG_FILE, is_onnx_folder

        self.run_dir = Path(run_dir)
        if is_onnx_folder(self.run_dir):  # an ONNX export: run by onnxruntime, no PyTorch model loaded
            self._load_onnx(trust_remote_code)
            return
        # An HF export (`lmtune export`): the model's files with the run's config beside them (lmtune.yaml).
        exported = (self.run_dir / "config.json").is_file() and (self.run_dir / CONFIG_FILE).is_file()
        folder = self.run_dir if exported else self.run_dir / "model"
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{self.run_dir} holds no finished model (expected {folder}/config.json, or an "
                                    "export's config.json or model.onnx beside its lmtune.yaml)")
        cfg = load_config(self.run_dir / (CONFIG_FILE if exported else "config.yaml"))
        cfg.model = cfg.model.model_copy(update={"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle})
        adapter = (folder / "adapter_config.json").is_file()
        model_cfg = cfg.model.model_copy(update={"name": str(folder / "base_config" if adapter else folder)})
        model_config = models.load_model_config(model_cfg)
        labels = [model_config.id2label[i] for i in range(len(model_config.id2label))] \
            if getattr(model_config, "id2label", None) else None
        task = TASKS[cfg.task.name](cfg.task, cfg.data, labels=labels)
        task.restore(model_config)  # what training saved with the model (a temperature, target scaling)
        if adapter:
            import peft

            # The pretrained backbone as in training, then the saved adapter and head on top. Its load report would
            # call the head "MISSING" (newly initialised): true for a moment, the adapter's copy replaces it.
            with _load_report_silenced(True):
                base, _ = models.load_model(task.auto_class, cfg.model, **task.model_kwargs())
            task.shape_model(base)  # the run's head (its weights come with the adapter)
            models.check_weight_format(folder, cfg.model)  # a pickled adapter (adapter_model.bin) only if allowed
            with models.pickle_refused(folder):
                model = peft.PeftModel.from_pretrained(base, folder)
        else:
            # With lmtune's head the report would call its weights unexpected and the class's head missing: both
            # true for a moment, shape_model puts the saved head back.
            with _load_report_silenced(getattr(model_config, "lmtune_pooling", None) is not None):
                model, _ = models.load_model(task.auto_class, model_cfg)
            task.shape_model(model, weights=folder)
        accelerator = make_accelerator(cfg.train.precision, device)
        model.to(accelerator.device).eval()  # (the head shape_model adds is made in training mode)
        self.session = Session(cfg, task, models.load_tokenizer(model_cfg, folder), model, accelerator)

    def _load_onnx(self, trust_remote_code: bool) -> None:
        from accelerate import Accelerator
        from transformers import AutoConfig

        from lmtune import models
        from lmtune.serving.onnx import CONFIG_FILE, MODEL_FILE, OUTPUTS, OnnxModel

        cfg = load_config(self.run_dir / CONFIG_FILE)
        cfg.model = cfg.model.model_copy(update={"trust_remote_code": trust_remote_code, "allow_pickle": False,
                                                 "name": str(self.run_dir)})
        config = AutoConfig.from_pretrained(self.run_dir)
        labels = [config.id2label[i] for i in range(len(config.id2label))]
        task = TASKS[cfg.task.name](cfg.task, cfg.data, labels=labels)
        task.restore(config)
        model = OnnxModel(self.run_dir / MODEL_FILE, config, OUTPUTS[cfg.task.name])
        self.session = Session(cfg, task, models.load_tokenizer(cfg.model, self.run_dir), model, Accelerator(cpu=True))

    def predict(self, inputs: list[Any], max_new_tokens: int | None = None) -> list[dict[str, Any]]:
        """Predict for raw inputs (strings, or dicts with the task's input fields); `max_new_tokens` bounds what a
        generating task writes (default: the run's task.max_new_tokens). A classification input longer than the
        model's max length is truncated, and its answer says so (`truncated: true`)."""
        task = self.session.task
        if task.generates:
            options = task.options
            if max_new_tokens is not None:
                task.options = options.model_copy(update={"max_new_tokens": max_new_tokens})
            try:
                return self.session.generate(task.from_texts(list(inputs)))
            finally:
                task.options = options
        features = self.session.encode(task.from_texts(list(inputs)))
        broken = {"error": "the model's scores for this input are not finite (NaN/inf): the model is broken (a "
                           "diverged run?)"}
        # finite_json replaces what is not finite: a prediction it leaves equal holds finite numbers only.
        preds = [pred if finite_json(pred) == pred else broken
                 for pred in task.postprocess(self.session.outputs(features), len(features))]
        if "truncated" in features.column_names:
            for pred, cut in zip(preds, features["truncated"][:]):
                if cut:
                    pred["truncated"] = True
        return preds

    def evaluate(self, path: str | Path, on_bad_rows: str | None = None) -> dict[str, Any]:
        """Score the model on a labelled file in the same format as the training data; bad rows are an error, or
        with on_bad_rows="skip" dropped (default: the run's data.on_bad_rows)."""
        task, configured = self.session.task, self.session.task.data
        try:
            if on_bad_rows is not None:
                task.data = configured.model_copy(update={"on_bad_rows": on_bad_rows})
            raw = task.load_eval_file(str(path))
        finally:
            task.data = configured
        features = self.session.encode(raw)
        scalars, details = self.session.evaluate(features)
        if not math.isfinite(scalars.get("loss", 0.0)):
            from lmtune.errors import DivergedError

            raise DivergedError(f"{self.run_dir}: the model's outputs on {path} are not finite (NaN/inf loss): its "
                                "scores would mean nothing (a diverged run?)")
        generation = self.session.score_generations(raw)
        return {**scalars, **details, "rows": len(features), **({"generation": generation} if generation else {})}


@contextlib.contextmanager
def _load_report_silenced(silenced: bool) -> Iterator[None]:
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    if silenced:
        report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)


def predict_rows(predictor: Predictor, inputs: list[Any], source: str, text_column: str | None = None
                 ) -> tuple[list[dict[str, Any]], int]:
    """One prediction per input, in order, and how many inputs had empty text (each gets an error record in its
    place); `text_column`, given, must be in every row (an error naming the row otherwise)."""
    data = predictor.session.cfg.data
    column, pair = text_column or data.text_column, data.text_pair_column
    if text_column:  # asked for by name: a row without it is an error naming it, not a missing `text`
        for row, record in enumerate(inputs, 1):
            if isinstance(record, dict) and text_column not in record:
                raise DataError(str(source), f"no {text_column!r} field (--text-column); fields found: "
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
    return [{"error": "empty text: nothing to predict"} if e else next(found) for e in empty], sum(empty)


def read_inputs(path: str, column: str = "text") -> list[Any]:
    """Inputs for predict: JSONL/JSON/CSV/TSV rows (dicts), or plain text lines (file or stdin), every line one
    input, blank ones too (the final line end makes no line)."""
    plain = Path(path).name.lower().removesuffix(".gz")
    if path == "-" or Path(plain).suffix in (".txt", ""):
        stdin = getattr(sys.stdin, "buffer", None) if path == "-" else None
        data = Path(path).read_bytes() if path != "-" else stdin.read() if stdin is not None else sys.stdin.read()
        try:
            if path.lower().endswith(".gz"):
                import gzip

                data = gzip.decompress(data)
            text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise DataError(path, f"cannot read as UTF-8 text lines ({err})") from None
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


def write_outputs(path: str, inputs: list[Any], preds: list[dict]) -> list[str]:
    """Each input row with its prediction's fields; a field the input has already (a gold `label` column, say) keeps
    the input's value and the prediction's is written as `predicted_<field>` (those fields are returned)."""
    rows, clashes = [], set()
    for given, pred in zip(inputs, preds):
        row = dict(given) if isinstance(given, dict) else {"text": given}
        clashes.update(k for k in pred if k in row)
        rows.append({**row, **{f"predicted_{k}" if k in row else k: v for k, v in pred.items()}})
    if path == "-":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return sorted(clashes)
    from lmtune.files import replace_file

    file, kind = check_output_path(path), Path(path.lower().removesuffix(".gz")).suffix
    if kind in (".csv", ".tsv"):
        import pandas as pd

        flat = [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows]
        text = pd.DataFrame(flat).to_csv(index=False, sep="\t" if kind == ".tsv" else ",")
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    data = text.encode("utf-8")
    if path.lower().endswith(".gz"):
        import gzip

        data = gzip.compress(data)
    replace_file(file, lambda tmp: tmp.write_bytes(data))  # a write cut short leaves the earlier file as it was
    return sorted(clashes)


def check_output_path(path: str) -> Path:
    """The file an output goes to, refused (before any work) where it cannot be one: a folder, or under a file."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{path} is a folder: give a file name for the output (.jsonl, .csv or .tsv, or .gz of one)")
    for parent in file.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{path}: {parent} is a file, not a folder")
    return file


def export(run_dir: str | Path, output: str | Path | None = None, merge: bool = True, overwrite: bool = False,
           format: str = "hf", quantize: str | None = None, **permissions: bool) -> Path:
    """Write the run's model as a plain HF folder (`format="hf"`) or an ONNX one (`"onnx"`, optionally `quantize=
    "int8"`, checked against PyTorch on the run's validation rows); adapters are merged into the weights (`merge`).
    `output` defaults to `<run>-<format>` beside the run.

    An existing non-empty `output` folder is replaced only with `overwrite`, and only if an earlier export wrote it
    (its `.lmtune` marker); a file, the run directory, a folder holding it or one inside it never is."""
    import tempfile

    from lmtune import folders
    from lmtune.files import replace_dir

    _check_format(Path(run_dir), format, quantize)
    output = Path(output) if output is not None else Path(run_dir).parent / f"{Path(run_dir).name}-{format}"
    _check_output(Path(run_dir), output, overwrite)
    # ONNX is traced and checked on the CPU (where onnxruntime runs it): the PyTorch side is loaded there too.
    session = Predictor(run_dir, device="cpu" if format == "onnx" else None, **permissions).session
    model = session.model
    if is_adapter(model):
        if model.active_peft_config.is_prompt_learning:
            raise ValueError(f"{run_dir} holds a prompt-tuning adapter: its virtual tokens are added at run time and "
                             "cannot be merged into the weights; use the run itself (lmtune.load, lmtune predict)")
        if not merge:
            raise ValueError(f"{run_dir} holds an adapter: export it with --merge")
        model = session.model = model.merge_and_unload()
        if format == "hf" and getattr(session.cfg.method, "quantize", None):  # QLoRA: merged into bf16 weights
            import torch

            model = session.model = model.to(torch.bfloat16)
    folders.make_parent(output.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))  # a name of its own
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        if format == "onnx":
            from lmtune.serving.onnx import write_onnx_folder

            write_onnx_folder(tmp, session, model, quantize)
        else:
            from lmtune.files import write_text
            from lmtune.serving.onnx import CONFIG_FILE

            model.save_pretrained(tmp)
            write_text(tmp / CONFIG_FILE, session.cfg.to_yaml())  # so lmtune.load / predict / serve run it as the run
        session.tokenizer.save_pretrained(tmp)
        if (Path(run_dir) / "metrics.json").is_file():  # the card, for the merged model now
            from lmtune.evaluation.card import write_card

            metrics = json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
            write_card(tmp, session.cfg, metrics, session.task.pipeline_tag, final=output, exported=True,
                       onnx=format == "onnx")
            shutil.copy2(Path(run_dir) / "metrics.json", tmp / "metrics.json")  # what `serve` shows as /v1/info
        (tmp / folders.MARKER).write_text(json.dumps({"kind": "export", "run": str(run_dir)}), encoding="utf-8")
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _check_format(run_dir: Path, format: str, quantize: str | None) -> None:
    """Refuse an export format the run cannot take, before any loading or folder (see `export`)."""
    if format not in ("hf", "onnx") or quantize not in (None, "int8") or (quantize and format != "onnx"):
        raise ValueError(f"export: --format is hf or onnx, --quantize int8 only with --format onnx (got {format!r}, "
                         f"{quantize!r})")
    if format == "onnx" and (run_dir / "config.yaml").is_file():
        from lmtune.serving.onnx import OUTPUTS

        task = load_config(run_dir / "config.yaml").task.name
        if task not in OUTPUTS:
            raise ValueError(f"ONNX export is for classification, NER and QA encoders; this run's task is {task!r}")


def _check_output(run_dir: Path, output: Path, overwrite: bool) -> None:
    """Refuse an export folder that is not one to write or replace (see `export`)."""
    from lmtune import folders

    folders.refuse_special(output)
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"{output} is a file; export writes a folder: choose another --output")
        if Path(run_dir).resolve().is_relative_to(output.resolve()):
            raise ValueError(f"{output} holds the run {run_dir} itself: choose another --output")
        if any(output.iterdir()) and not overwrite:
            raise ValueError(f"{output} exists and is not empty: choose another --output, or pass --overwrite to "
                             "replace it")
    if output.resolve().is_relative_to(Path(run_dir).resolve()):  # its model/, plots/ ... would be replaced
        raise ValueError(f"{output} lies inside the run {run_dir}: choose a folder outside it for --output")
    if output.is_dir() and any(output.iterdir()) and (folders.read_marker(output) or {}).get("kind") != "export":
        raise FolderError(f"{output} was not written by `lmtune export` (it has no {folders.MARKER} marker of "
                                 "one): --overwrite replaces only an earlier export; choose another --output or move "
                                 "that folder away yourself")


def load(run_dir: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False,
         device: str | None = None) -> Predictor:
    """A finished run (or its ONNX export), ready to predict; `trust_remote_code` / `allow_pickle` are yours to give
    (never its config's); `device`: auto (default), cpu or cuda."""
    return Predictor(run_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, device=device)


def evaluate(run_dir: str | Path, data: str | Path, on_bad_rows: str | None = None, **permissions: bool
             ) -> dict[str, Any]:
    return Predictor(run_dir, **permissions).evaluate(data, on_bad_rows)
