"""`lmtune inspect`: a task's data profiled against a tokenizer (lengths, truncation, unknown tokens, duplicates)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.config import RunConfig, load_config

log = logging.getLogger("lmtune")
SPLITS = ("train", "validation", "test")
PERCENTILES = (50, 90, 99)
_DUPLICATE_EXAMPLES = 3


def segments(ds: Any) -> list[tuple[str, ...]]:
    """Each example's texts as the task feeds them to the tokenizer: (text[, pair]), (question, context), (words,),
    a chat's turns joined by newlines (its template's role markers not counted)."""
    columns = ds.column_names
    if "messages" in columns:  # instruct; replay documents mixed into training have no messages
        return [("\n".join(turn["content"] for turn in chat),) if chat is not None else (text,)
                for chat, text in zip(ds["messages"][:], ds["replay_text"][:] if "replay_text" in columns
                                      else [""] * len(ds))]
    if "tokens" in columns:  # NER: the given words, joined by spaces
        return [(" ".join(tokens),) for tokens in ds["tokens"][:]]
    if "question" in columns and "context" in columns:
        return list(zip(ds["question"][:], ds["context"][:]))
    if "text_pair" in columns:
        return list(zip(ds["text"][:], ds["text_pair"][:]))
    return [(text,) for text in ds["text"][:]]


def is_byte_level(tokenizer: Any) -> bool:
    """Byte-level BPE (GPT-2, Llama 3, SmolLM) spells any input in bytes: it has no unknown token to emit."""
    from lmtune.models import byte_level_steps

    return bool(byte_level_steps(tokenizer))


def spread(values: np.ndarray) -> dict[str, float]:
    """Percentiles p50/p90/p99, max and mean of a length array (zeros for an empty one)."""
    if not len(values):
        return {**{f"p{p}": 0.0 for p in PERCENTILES}, "max": 0.0, "mean": 0.0}
    out = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    return {**out, "max": float(values.max()), "mean": round(float(values.mean()), 2)}


def token_counts(tokenizer: Any, examples: list[tuple[str, ...]]) -> tuple[np.ndarray, int]:
    """Tokens per example without special tokens (all segments summed), and how many are the unknown token."""
    counts = np.zeros(len(examples), dtype=np.int64)
    unknown, unk_id = 0, tokenizer.unk_token_id
    width = max((len(e) for e in examples), default=0)
    for j in range(width):
        ids = tokenizer([e[j] if j < len(e) else "" for e in examples], add_special_tokens=False)["input_ids"]
        counts += np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        if unk_id is not None:
            unknown += sum(row.count(unk_id) for row in ids)
    return counts, unknown


def tokenizer_fit(tokenizer: Any, examples: list[tuple[str, ...]], max_length: int) -> dict[str, Any]:
    """Words and tokens per example, fertility (tokens per word), unknown-token rate and the share over max length.

    Words are whitespace-split; fertility and the unknown rate count tokens without special tokens, the
    lengths (and so truncation) include them, as the model sees them.
    """
    counts, unknown = token_counts(tokenizer, examples)
    pair = any(len(e) > 1 for e in examples)
    lengths = counts + tokenizer.num_special_tokens_to_add(pair=pair)
    words = np.array([sum(len(s.split()) for s in e) for e in examples], dtype=np.int64)
    over = int((lengths > max_length).sum())
    return {"rows": len(examples), "words": spread(words), "tokens": spread(lengths),
            "truncated_rows": over, "truncated": over / len(examples) if len(examples) else 0.0,
            "unk_rate": unknown / counts.sum() if counts.sum() else 0.0,
            "fertility": float(counts.sum() / words.sum()) if words.sum() else 0.0,
            "lengths": lengths}


def label_balance(ds: Any) -> tuple[str, dict[str, int]]:
    """What the task's examples are labelled with, counted: class labels, entity types or answerable questions."""
    columns = ds.column_names
    if "labels" in columns:
        return "label", dict(Counter(name for labels in ds["labels"][:] for name in labels).most_common())
    if "tags" in columns:
        return "entity", dict(Counter(t[2:] for tags in ds["tags"][:] for t in tags if t.startswith("B-"))
                              .most_common())
    if "is_impossible" in columns:
        impossible = sum(map(bool, ds["is_impossible"][:]))
        return "answer", {"answerable": len(ds) - impossible, "unanswerable": impossible}
    return "none", {}


def duplicates(keys: dict[str, list[str]]) -> dict[str, Any]:
    """Exact duplicates within each split (rows beyond a text's first) and texts shared across splits."""
    within = {}
    for name, texts in keys.items():
        repeated = [(t, c) for t, c in Counter(texts).most_common() if c > 1]
        within[name] = {"rows": sum(c - 1 for _, c in repeated), "texts": len(repeated),
                        "examples": [{"text": t, "count": c} for t, c in repeated[:_DUPLICATE_EXAMPLES]]}
    across = {}
    for first, second in combinations([s for s in SPLITS if s in keys], 2):
        shared = set(keys[first]) & set(keys[second])
        across[f"{first}/{second}"] = {"texts": len(shared), "rows": sum(t in shared for t in keys[second]),
                                       "examples": sorted(shared)[:_DUPLICATE_EXAMPLES]}
    return {"within": within, "across": across}


def target_spread(ds: Any, names: list[str]) -> dict[str, dict[str, float]]:
    """Regression: each target's mean, standard deviation, min, median and max in a split."""
    values = np.asarray(ds["targets"][:], dtype=np.float64).reshape(len(ds), -1)
    if not len(values):
        return {}
    return {name: {"mean": float(values[:, j].mean()), "std": float(values[:, j].std()), "min": float(values[:, j].min()),
                   "p50": float(np.median(values[:, j])), "max": float(values[:, j].max())}
            for j, name in enumerate(names)}


def profile(splits: dict[str, Any], tokenizer: Any, max_length: int, targets: list[str] | None = None
            ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The data profile (JSON-able) and the token lengths per split (for the histogram); `targets`: a regression's
    target names (their spread is profiled too)."""
    ordered = [s for s in SPLITS if s in splits] + [s for s in splits if s not in SPLITS]
    examples = {name: segments(splits[name]) for name in ordered}
    stats, lengths, labels = {}, {}, {}
    kind = "none"
    for name in ordered:
        fit = tokenizer_fit(tokenizer, examples[name], max_length)
        lengths[name] = fit.pop("lengths")
        stats[name] = fit
        if targets and "targets" in splits[name].column_names:
            stats[name]["targets"] = target_spread(splits[name], targets)
        kind, labels[name] = label_balance(splits[name])
    return {"tokenizer": type(tokenizer).__name__, "byte_level": is_byte_level(tokenizer),
            "max_length": max_length, "splits": stats, "label_kind": kind, "labels": labels,
            "duplicates": duplicates({n: ["\t".join(e) for e in examples[n]] for n in ordered})}, lengths


def load_data(cfg: RunConfig) -> tuple[Any, dict[str, Any]]:
    """The configured task and its splits, read and checked as training reads them."""
    from lmtune.registry import TASKS

    task = TASKS[cfg.task.name](cfg.task, cfg.data)
    splits, _ = task.load_splits(cfg.train.seed)
    train = splits.get("train")
    columns = train.column_names if train is not None else []
    # Replay documents (data.replay) ride in the training split; profiled as a split of their own.
    flags = (train["replay"][:] if "replay" in columns else
             [t is not None for t in train["replay_text"][:]] if "replay_text" in columns else [])
    if any(flags):
        splits["train"] = train.select([i for i, f in enumerate(flags) if not f])
        splits["replay"] = train.select([i for i, f in enumerate(flags) if f])
    return task, splits


def inspect(config: str | Path | dict | RunConfig, overrides: list[str] | None = None,
            output: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Profile the configured data against `model.name`'s tokenizer; writes inspect.json and length_distribution.png."""
    from lmtune import models

    cfg = load_config(config, overrides)
    stem = Path(config).stem if isinstance(config, (str, Path)) else "run"
    tokenizer = models.load_tokenizer(cfg.model)
    limit = models.max_length(cfg.model, tokenizer, models.load_model_config(cfg.model))
    task, splits = load_data(cfg)
    result, lengths = profile(splits, tokenizer, limit, task.labels if cfg.task.name == "regression" else None)
    result = {"model": cfg.model.name, "task": cfg.task.name, **result}
    folder = Path(output or Path(cfg.output.dir) / f"{stem}-inspect")
    folder.mkdir(parents=True, exist_ok=True)
    from lmtune.files import write_text

    write_text(folder / "inspect.json", json.dumps(result, indent=2, ensure_ascii=False))
    plot_lengths(lengths, result, folder / "length_distribution.png")
    return folder, result


def plot_lengths(lengths: dict[str, np.ndarray], result: dict[str, Any], path: Path) -> Path:
    """Histogram of token lengths per split, the max length as a vertical line, the truncated share in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmtune.files import replace_file

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    limit = result["max_length"]
    top = max([limit + 1] + [int(v.max()) for v in lengths.values() if len(v)])
    bins = np.linspace(0, top, min(60, top) + 1)
    for name, values in lengths.items():
        share = result["splits"][name]["truncated"]
        ax.hist(values, bins=bins, histtype="step", weights=np.full(len(values), 1 / max(len(values), 1)),
                linewidth=1.5,
                label=f"{name} ({len(values)} rows, {share:.1%} over max length)")
    ax.axvline(limit, color="black", linestyle="--", label=f"max length {limit}")
    ax.set_xlabel(f"tokens per example ({result['tokenizer']}, special tokens included)")
    ax.set_ylabel("share of examples")
    ax.set_title(f"Length distribution ({result['model']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def tables(result: dict[str, Any]) -> list[Any]:
    """The profile as rich tables for the console: lengths and tokenizer fit, labels, duplicates."""
    from rich.table import Table
    from rich.text import Text

    unk_note = " (byte-level: none)" if result["byte_level"] else ""
    main = Table(title=f"data vs {result['model']} tokenizer (max length {result['max_length']})")
    for column in ("split", "rows", "words p50/90/99/max", "tokens p50/90/99/max", "over max",
                   f"unknown{unk_note}", "tokens/word"):
        main.add_column(column, justify="left" if column == "split" else "right")
    for name, s in result["splits"].items():
        main.add_row(name, str(s["rows"]), _quantiles(s["words"]), _quantiles(s["tokens"]),
                     f"{s['truncated']:.1%} ({s['truncated_rows']})", f"{s['unk_rate']:.2%}", f"{s['fertility']:.2f}")
    labels = Table(title=f"{result['label_kind']} counts")
    names = list(dict.fromkeys(k for counts in result["labels"].values() for k in counts))
    labels.add_column(result["label_kind"])
    for split in result["labels"]:
        labels.add_column(split, justify="right")
    for key in names:
        labels.add_row(Text(str(key)), *(_count_share(result["labels"][s], key) for s in result["labels"]))
    dups = Table(title="exact duplicates")
    for column in ("where", "duplicate rows", "distinct texts", "examples"):
        dups.add_column(column, justify="left" if column in ("where", "examples") else "right")
    for where, d in {**result["duplicates"]["within"], **result["duplicates"]["across"]}.items():
        shown = [e["text"] if isinstance(e, dict) else e for e in d["examples"]]
        dups.add_row(where, str(d["rows"]), str(d["texts"]), Text(" | ".join(_cut(t) for t in shown)))  # data: no markup
    spreads = Table(title="targets")
    for column in ("split", "target", "mean", "std", "min", "median", "max"):
        spreads.add_column(column, justify="left" if column in ("split", "target") else "right")
    for split, s in result["splits"].items():
        for target, v in s.get("targets", {}).items():
            spreads.add_row(split, target, *(f"{v[k]:.3g}" for k in ("mean", "std", "min", "p50", "max")))
    shown = [main, labels] if names else [main]  # unlabelled text (LM tasks, regression): no counts table
    return shown + ([spreads] if spreads.row_count else []) + [dups]


def _quantiles(s: dict[str, float]) -> str:
    return "/".join(f"{s[k]:.0f}" for k in ("p50", "p90", "p99", "max"))


def _count_share(counts: dict[str, int], key: str) -> str:
    total = sum(counts.values())
    return f"{counts.get(key, 0)} ({counts.get(key, 0) / total:.0%})" if total else "0"


def _cut(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
