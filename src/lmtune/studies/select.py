"""`lmtune select`: rank candidate pretrained models for the configured task and data, cheaply, before training.

For each candidate, on a sample of the training data: tokenizer fit (unknown-token rate, share of
examples over max length, tokens per word), transferability (a linear probe with cross-validation on
frozen features: classification, regression and NER), domain fit (perplexity, for causal LMs) and cost (parameters,
seconds per 1k examples of feature extraction, memory). The probe runs on up to four layers (quarter points of the stack and
its top) and its best score counts: a decoder's middle layers hold more of a sentence than its last.

Ranking rule: candidates that could be assessed come before those that failed; then the probe score,
higher first (rounded to 0.001, so noise-level differences fall through to the next keys); then
tokenizer fit: unknown-token rate, share over max length, tokens per word, each lower first; then
perplexity per word, lower first. Without a probe (QA, multi-label) tokenizer fit decides.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.config import RunConfig, load_config
from lmtune.studies.inspect import load_data, segments, tokenizer_fit

log = logging.getLogger("lmtune")


@dataclass
class Selection:
    """A finished ranking: best first, with its folder (select.json) and the recommendation sentence."""

    folder: Path
    ranking: list[dict[str, Any]]
    recommendation: str
    winner: str | None


@dataclass
class Sample:
    """The examples every candidate sees: texts to tokenize, inputs for the model and probe targets."""

    task: str
    texts: list[tuple[str, ...]]  # train sample then validation part: for tokenizer fit
    inputs: list[Any]  # train sample: text tuples, or word lists for NER
    targets: Any  # class index per example, or tag indices per word (NER); None: no probe
    outside: int = -1  # NER: index of the O tag
    no_probe: str = ""


def draw_sample(cfg: RunConfig, task: Any, splits: dict[str, Any], n: int, seed: int) -> Sample:
    """`n` training rows (stratified by label for single-label classification) and up to n/4 validation rows."""
    from lmtune.data import stratified_subset

    train = splits["train"]
    stratum = "label_key" if "label_key" in train.column_names else None
    train = stratified_subset(train, n, seed, stratum)
    texts = segments(train)
    if "validation" in splits and len(splits["validation"]):
        texts += segments(stratified_subset(splits["validation"], max(1, n // 4), seed))
    name = cfg.task.name
    if "tokens" in train.column_names:
        index = {tag: i for i, tag in enumerate(task.labels)}
        return Sample(name, texts, [list(t) for t in train["tokens"][:]],
                      [[index[t] for t in tags] for tags in train["tags"][:]], outside=index["O"])
    if stratum is not None:
        index = {label: i for i, label in enumerate(task.labels)}
        return Sample(name, texts, segments(train), np.array([index[v] for v in train["label_key"][:]]))
    if "targets" in train.column_names:  # regression
        return Sample(name, texts, segments(train), np.asarray(train["targets"][:], dtype=np.float64))
    reason = "no probe for multi-label classification" if "labels" in train.column_names else f"no probe for {name}"
    return Sample(name, texts, segments(train), None, no_probe=reason)


def _memory() -> tuple[float, str]:
    """Memory in MB now: peak CUDA allocation on a GPU, else this process's resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "peak GPU memory allocated"
    import psutil

    return psutil.Process().memory_info().rss / 2**20, "process RSS growth (CPU)"


def assess(name: str, cfg: RunConfig, sample: Sample, folds: int, seed: int) -> dict[str, Any]:
    """Every signal for one candidate; a candidate that cannot be loaded or run gets `error` instead."""
    row: dict[str, Any] = {"model": name}
    model = None
    try:
        model = _assess(name, cfg, sample, folds, seed, row)
    except Exception as err:  # one broken candidate must not stop the ranking of the others
        log.warning("select: %s failed: %s", name, err)
        row["error"] = f"{type(err).__name__}: {err}"
    finally:
        del model
        gc.collect()
    return row


def _assess(name: str, cfg: RunConfig, sample: Sample, folds: int, seed: int, row: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from lmtune import models
    from lmtune.evaluation import probe
    from lmtune.studies.inspect import is_byte_level

    model_cfg = cfg.model.model_copy(update={"name": name})
    tokenizer = models.load_tokenizer(model_cfg)
    model_config = models.load_model_config(model_cfg)
    positions = getattr(model_config, "max_position_embeddings", None)
    if cfg.model.max_length and positions and cfg.model.max_length > positions:
        # The config's length was written for another model: judge this one at its own limit (the table says so).
        model_cfg = model_cfg.model_copy(update={"max_length": positions})
    limit = models.max_length(model_cfg, tokenizer, model_config)
    fit = tokenizer_fit(tokenizer, sample.texts, limit)
    row.update(max_length=limit, byte_level=is_byte_level(tokenizer), unk_rate=fit["unk_rate"],
               truncated=fit["truncated"], fertility=fit["fertility"])
    causal = probe.is_causal_lm(model_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before, memory_kind = _memory()
    model, _ = models.load_model(AutoModelForCausalLM if causal else AutoModel, model_cfg)
    model.eval().to(device)
    words = sample.task == "ner"
    feats = probe.extract(model, tokenizer, sample.inputs, limit, words=words, causal=causal,
                          desc=Path(name).name or name)
    after, _ = _memory()
    row.update(params=sum(p.numel() for p in model.parameters()),
               seconds_per_1k=1000 * feats.seconds / max(len(sample.inputs), 1),
               memory_mb=after if device.type == "cuda" else max(after - before, 0.0), memory_kind=memory_kind)
    ppl = feats.perplexity()
    if ppl is not None:
        # per word of what was scored (truncated words never were: counting them flattered short limits)
        row.update(perplexity=ppl, word_perplexity=math.exp(feats.nll / max(feats.scored_words, 1)))
    if sample.targets is None:
        row["probe"] = {"error": sample.no_probe}
        return model
    scores = {}
    for layer in feats.pooled:  # the best layer counts (see probe.probe_layers)
        pooled = None if words else np.stack(feats.pooled[layer])
        scores[layer] = (probe.probe_ner(feats.words[layer], sample.targets, sample.outside, folds) if words else
                         probe.probe_regression(pooled, sample.targets, folds, seed) if sample.task == "regression"
                         else probe.probe_classification(pooled, sample.targets, folds, seed))
    best = max(scores, key=lambda layer: scores[layer].get("score", -math.inf))
    row["probe"] = {**scores[best], "layer": best,
                    "layers": {str(layer): scores[layer].get("score") for layer in sorted(scores)}}
    return model


def _score(row: dict[str, Any]) -> float | None:
    return row.get("probe", {}).get("score")


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first, by the rule in the module docstring."""
    def key(r: dict[str, Any]) -> tuple:
        if "error" in r:
            return (1,)
        score = _score(r)
        return (0, -round(score, 3) if score is not None else 0.0, round(r["unk_rate"], 4), round(r["truncated"], 4),
                round(r["fertility"], 3), r.get("word_perplexity", math.inf))

    return sorted(rows, key=key)


def recommend(ranking: list[dict[str, Any]]) -> str:
    """One sentence: the winner, its probe score against the others', and its tokenizer fit and cost."""
    ok = [r for r in ranking if "error" not in r]
    if not ok:
        return "no candidate could be assessed: " + "; ".join(f"{r['model']}: {r['error']}" for r in ranking)
    best = ok[0]
    parts = []
    if _score(best) is not None:
        others = ", ".join(f"{_score(r):.2f} ({r['model']})" for r in ok[1:] if _score(r) is not None)
        parts.append(f"probe {best['probe']['metric']} {_score(best):.2f}" + (f" vs {others}" if others else ""))
    unknown = "no unknown tokens (byte-level)" if best["byte_level"] else f"{best['unk_rate']:.1%} unknown tokens"
    parts.append(f"{unknown}, {best['fertility']:.2f} tokens per word, {best['truncated']:.1%} over max length")
    if "word_perplexity" in best:
        parts.append(f"perplexity {best['word_perplexity']:.1f} per word")
    parts.append(f"{_params(best['params'])} parameters, {best['seconds_per_1k']:.1f} s per 1k examples")
    how = "" if _score(best) is not None else " by tokenizer fit"
    return f"{best['model']} fits this data best{how}: " + "; ".join(parts) + "."


def select(config: str | Path | dict | RunConfig, candidates: list[str], overrides: list[str] | None = None,
           sample: int = 1000, folds: int = 5, output: str | Path | None = None) -> Selection:
    """Assess every candidate on one sample of the configured data, rank them and write select.json."""
    if not candidates:
        raise ValueError("--candidates: give at least one model (built-in name, local folder or Hub id)")
    if sample < 2 or folds < 2:
        raise ValueError(f"--sample {sample} --folds {folds}: need at least 2 examples and 2 folds")
    cfg = load_config(config, overrides)
    stem = Path(config).stem if isinstance(config, (str, Path)) else "run"
    seed = cfg.train.seed
    task, splits = load_data(cfg)
    drawn = draw_sample(cfg, task, splits, sample, seed)
    rows = [assess(name, cfg, drawn, folds, seed) for name in candidates]
    ranking = rank(rows)
    for place, row in enumerate(ranking, 1):
        row["rank"] = place
    sentence = recommend(ranking)
    winner = next((r["model"] for r in ranking if "error" not in r), None)
    folder = Path(output or Path(cfg.output.dir) / f"{stem}-select")
    folder.mkdir(parents=True, exist_ok=True)
    report = {"task": cfg.task.name, "sample": {"train": len(drawn.inputs), "texts": len(drawn.texts)},
              "folds": folds, "seed": seed, "rule": __doc__.split("Ranking rule: ")[1].strip().replace("\n", " "),
              "winner": winner, "recommendation": sentence, "ranking": ranking}
    from lmtune.files import write_text
    from lmtune.training.logs import finite_json

    write_text(folder / "select.json", json.dumps(finite_json(report), indent=2, default=float, allow_nan=False))
    return Selection(folder, ranking, sentence, winner)


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def table(selection: Selection) -> Any:
    """The ranking as a rich table: one row per candidate, one column per signal."""
    from rich.markup import escape
    from rich.table import Table

    out = Table(title="candidates, best first")
    for column in ("rank", "model", "probe", "unknown", "over max", "tokens/word", "perplexity/word", "params",
                   "s/1k", "memory MB"):
        out.add_column(column, justify="left" if column == "model" else "right")
    for r in selection.ranking:
        if "error" in r:
            reason = r["error"] if len(r["error"]) <= 60 else r["error"][:59] + "…"  # all of it in select.json
            out.add_row(str(r["rank"]), r["model"], f"[red]failed: {escape(reason)}[/]", *[""] * 7)
            continue
        p = r.get("probe", {})
        shown = f"{p['score']:.3f} {p['metric']}" if "score" in p else p.get("error", "")
        out.add_row(str(r["rank"]), r["model"], shown, "byte-level" if r["byte_level"] else f"{r['unk_rate']:.2%}",
                    f"{r['truncated']:.1%}", f"{r['fertility']:.2f}",
                    f"{r['word_perplexity']:.1f}" if "word_perplexity" in r else "n/a", _params(r["params"]),
                    f"{r['seconds_per_1k']:.1f}", f"{r['memory_mb']:.0f}")
    kinds = {r["memory_kind"] for r in selection.ranking if "memory_kind" in r}
    out.caption = f"memory: {', '.join(kinds)}; perplexity only for causal LMs" if kinds else None
    return out
