"""The model card (README.md in a saved model folder): Hub metadata with the metrics in model-index form, then what
the model does, how it was trained, on what, how well, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtune.split_names import eval_split_names

if TYPE_CHECKING:
    from lmtune.config import RunConfig

# The Hub repositories the built-in models were published from (the built-in names are lmtune's own).
BUILTIN_SOURCES = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
                   "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HYPERPARAMETERS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "schedule", "warmup_ratio",
                   "weight_decay", "max_grad_norm", "label_smoothing", "ema_decay", "precision", "seed")


def base_model(name: str) -> str | None:
    """The Hub id the model came from, where it is one (a local folder has none)."""
    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[name]
    from lmtune import hub

    parsed = hub.parse_id(name)
    return parsed[0] if parsed and not Path(name).expanduser().exists() else None


def scalars(split_metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics of one split that are single real numbers (not counts)."""
    return {k: float(v) for k, v in split_metrics.items()
            if isinstance(v, float) and not isinstance(v, bool) and v == v}


def write_card(folder: Path, cfg: RunConfig, metrics: dict[str, Any], pipeline_tag: str | None,
               adapter: bool = False, final: Path | None = None, exported: bool = False, onnx: bool = False) -> Path:
    """Write `folder`/README.md for a model trained as `cfg` that scored `metrics` (metrics.json's contents);
    `final`: where the folder will be once moved into place (the path the card shows); `exported`: a plain folder
    written by `lmtune export` (loaded with transformers alone), not a run's model."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    files = {"validation": cfg.data.validation, **{key: path for key, _, path, _ in cfg.data.test_sets()}}
    results = [EvalResult(task_type=pipeline_tag or cfg.task.name, metric_type=key, metric_value=round(value, 6),
                          **_dataset(files.get(split) or cfg.data.train, split))
               for split in eval_split_names(metrics) for key, value in scalars(metrics.get(split, {})).items()]
    card_data = ModelCardData(
        base_model=base_model(cfg.model.name), library_name="peft" if adapter else "transformers",
        pipeline_tag=pipeline_tag, tags=["lmtune", cfg.task.name, cfg.method.name],
        model_name=metrics.get("run", (final or folder).parent.name), eval_results=results or None)
    body = "\n\n".join(part for part in (_about(cfg, metrics, pipeline_tag, adapter), _training(cfg, metrics),
                                         _results(metrics), _onnx_use(final or folder) if onnx else
                                         _loading(final or folder, pipeline_tag, adapter, exported, _own_head(folder)),
                                         _limitations(metrics)) if part)
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")
    card.save(folder / "README.md")
    return folder / "README.md"


def _dataset(source: str | None, split: str) -> dict[str, Any]:
    """model-index's dataset of a split: a Hub dataset by its id, config, split and commit; a file by its name (a
    split carved off the training file is still that file's)."""
    from lmtune import hub

    if source and hub.is_dataset_name(source):
        repo, revision, config, hub_split = hub.parse_dataset_name(source)
        return {"dataset_type": repo, "dataset_name": repo, "dataset_config": config, "dataset_revision": revision,
                "dataset_split": hub_split}
    name = Path(source).name if source else "local data"
    return {"dataset_type": name, "dataset_name": name, "dataset_split": split}


def _about(cfg: RunConfig, metrics: dict[str, Any], pipeline_tag: str | None, adapter: bool) -> str:
    labels = metrics.get("data", {}).get("labels") or []
    text = (f"# {metrics.get('run', 'lmtune run')}\n\n{cfg.model.name} fine-tuned with "
            f"lmtune for the `{cfg.task.name}` task"
            f"{f' ({pipeline_tag})' if pipeline_tag else ''} by the `{cfg.method.name}` method"
            f"{': this folder holds the adapter, loaded on top of the base model' if adapter else ''}.")
    if labels:
        text += f" Labels: {', '.join(f'`{label}`' for label in labels)}."
    return text


def _training(cfg: RunConfig, metrics: dict[str, Any]) -> str:
    data = metrics.get("data", {})
    files = [f"{split}: `{path}`" for split, path in (("train", cfg.data.train), ("validation", cfg.data.validation),
                                                      *((k, p) for k, _, p, _ in cfg.data.test_sets())) if path]
    rows = ", ".join(f"{split} {n:,}" for split, n in data.get("rows", {}).items())
    balance = "; ".join(f"{split}: " + ", ".join(f"{label} {n}" for label, n in counts.items())
                        for split, counts in data.get("label_counts", {}).items())
    stages = "\n".join(f"| {name} | {info.get('trainable_params', 0):,} of {info.get('total_params', 0):,} | "
                       f"{info.get('steps', '')} | {info.get('seconds', '')} |"
                       for name, info in metrics.get("stages", {}).items())
    train = cfg.train.model_dump()
    settings = ", ".join(f"{k} {train[k]}" for k in HYPERPARAMETERS if train.get(k) is not None)
    return "\n".join([
        "## Training", "",
        f"Data: {'; '.join(files) or 'see the run config'} (rows: {rows or 'n/a'})."
        + (f" Label balance: {balance}." if balance else ""), "",
        f"Model: `{cfg.model.name}`, max length {cfg.model.max_length or 'the model’s own'}. Hyperparameters: "
        f"{settings}. Method `{cfg.method.name}`, in {len(metrics.get('stages', {}))} stage(s):", "",
        "| stage | trainable parameters | steps | seconds |", "|---|---|---|---|", stages])


def _results(metrics: dict[str, Any]) -> str:
    lines = ["## Results", "", "| split | metric | value |", "|---|---|---|"]
    for split in eval_split_names(metrics):
        for key, value in scalars(metrics.get(split, {})).items():
            lines.append(f"| {split} | {key} | {value:.4f} |")
        base = metrics.get(split, {}).get("majority_baseline")
        if base:
            lines.append(f"| {split} | majority class (`{base['label']}` always): accuracy / macro-F1 | "
                         f"{base['accuracy']:.4f} / {base['macro_f1']:.4f} |")
    selection = metrics.get("selection", {})
    if selection.get("best") is not None:
        lines += ["", f"The weights kept are those of step {selection.get('best_step')}, best by validation "
                      f"{selection.get('metric')} ({selection['best']:.4f})."]
    if "overfitting" in metrics:
        lines += ["", f"Overfitting: {metrics['overfitting'].get('message', '')}"]
    forgetting = metrics.get("forgetting") or {}
    if "general_text" in forgetting:
        lines += ["", f"Forgetting: perplexity on `{forgetting['general_text']}` {forgetting['perplexity_before']:.2f} "
                      f"before training, {forgetting['perplexity_after']:.2f} after "
                      f"({100 * forgetting['relative_change']:+.1f}%)."]
    if "reference_probe" in forgetting:
        probe = forgetting["reference_probe"]
        lines += ["", f"Forgetting: a linear probe on the backbone's features for `{probe['data']}` ({probe['task']}) "
                      f"scored {probe['metric']} {forgetting['reference_probe_before']:.4f} before training, "
                      f"{forgetting['reference_probe_after']:.4f} after "
                      f"(drop {forgetting['reference_probe_drop']:+.4f})."]
    return "\n".join(lines)


def _own_head(folder: Path) -> str | None:
    """lmtune's pooling head where the saved model has one (task.pooling / task.head), described; else None."""
    for config in (folder / "config.json", folder / "base_config" / "config.json"):
        if config.is_file():
            saved = json.loads(config.read_text(encoding="utf-8"))
            if saved.get("lmtune_pooling"):
                head = "an MLP" if saved["lmtune_head"] == "mlp" else "a linear layer"
                return f"{saved['lmtune_pooling']} pooling into {head}"
    return None


def _loading(folder: Path, pipeline_tag: str | None, adapter: bool, exported: bool, head: str | None = None) -> str:
    run = folder.parent
    lines = ["## Use", ""]
    if not exported:
        lines += ["```python", "import lmtune", "", f'model = lmtune.load("{run}")', 'model.predict(["an input"])',
                  "```", ""]
    if head:  # a plain pipeline would build the transformers class's own head, untrained, and answer at random
        lines += [f"Its head is lmtune's own ({head}, weights `lmtune_head.*`, settings `lmtune_*` in config.json), "
                  "which no transformers class represents: a plain `transformers.pipeline` would build the class's "
                  "own head, untrained, and answer at random. Load it with lmtune (`lmtune.load`, `lmtune predict`, "
                  "`lmtune serve`), or export it with `lmtune export --format onnx`, which carries the head."]
        if adapter:
            lines += ["", f"`lmtune export {run} -o merged/` writes one folder with the adapter merged."]
        return "\n".join(lines)
    if pipeline_tag and not adapter:
        lines += ["As a plain Hugging Face model:" if exported else "or, as a plain Hugging Face model:", "",
                  "```python", "from transformers import pipeline", "",
                  f'pipe = pipeline("{pipeline_tag}", model="{folder}")', "```"]
    if adapter:
        lines += ["", f"`lmtune export {run} -o merged/` writes a plain Hugging Face folder with the adapter merged."]
    return "\n".join(lines)


def _onnx_use(folder: Path) -> str:
    return "\n".join([
        "## Use", "", "`model.onnx` runs with onnxruntime (inputs `input_ids`, `attention_mask` and, where the "
        "tokenizer makes them, `token_type_ids`; the tokenizer files are here). lmtune runs the folder as it runs the "
        "run itself:",
        "", "```bash", f"lmtune predict {folder} --input inputs.jsonl", f"lmtune serve {folder}", "```", "",
        "`verification.json` says how closely it matched the PyTorch model on the run's validation rows."])


def _limitations(metrics: dict[str, Any]) -> str:
    rows = metrics.get("data", {}).get("rows", {}).get("train")
    return ("## Limitations\n\n"
            f"Trained on {f'{rows:,} examples' if rows else 'the data above'} from one source: expect lower quality on "
            "text unlike it (other domains, styles, languages, lengths), and check it on your own data before use. "
            "The scores above are on the run's own validation and test splits.")
