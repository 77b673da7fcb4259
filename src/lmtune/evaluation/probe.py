"""Cheap signals of how well a frozen pretrained model suits a task: its features, linear probes on them, perplexity."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def is_causal_lm(model_config: Any) -> bool:
    """Saved with a language-modelling head (Llama, GPT-2, SmolLM ...), so its perplexity means something."""
    architectures = getattr(model_config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


@dataclass
class Features:
    """What one pass of a frozen model over the sample gave."""

    # Keyed by layer (see probe_layers), per example: the mean over its tokens / first sub-token of each kept word.
    pooled: dict[int, list[np.ndarray]] = field(default_factory=dict)
    words: dict[int, list[np.ndarray]] = field(default_factory=dict)
    kept_words: list[int] = field(default_factory=list)  # words per example that fit in max length
    nll: float = 0.0  # summed negative log-likelihood of the predicted tokens (causal LMs)
    predicted: int = 0  # tokens predicted (every real token but the first of each example)
    scored_words: int = 0  # words inside the tokens that fit in max length (the unit of a per-word perplexity)
    seconds: float = 0.0

    def perplexity(self) -> float | None:
        return math.exp(self.nll / self.predicted) if self.predicted else None


def probe_layers(blocks: int) -> list[int]:
    """Layers whose outputs are probed: the quarter points of the stack and its top (hidden-state indices, 0 =
    embeddings). The best of them counts: a decoder's middle layers carry more of a sentence than its last,
    which is shaped for predicting the next token."""
    return sorted({max(1, round(blocks * q)) for q in (0.25, 0.5, 0.75)} | {blocks})


def _prepare(tokenizer: Any) -> Any:
    # Decoders often ship without a pad token; padding is masked out below, so any id will do.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"  # the shifted next-token targets assume real tokens come first
    return tokenizer


def extract(model: Any, tokenizer: Any, examples: list[Any], max_length: int, *, words: bool = False,
            causal: bool = False, batch_size: int = 16, desc: str = "") -> Features:
    """Run the frozen model over `examples` (tuples of texts, or word lists when `words`) in length-sorted batches.

    Per layer of `probe_layers`: mean-pooled hidden states (over real tokens: works for encoders and decoders
    alike) and the first sub-token of each word (`words`); with a causal LM head the next-token log-likelihood.
    """
    import torch
    from tqdm.auto import tqdm

    _prepare(tokenizer)
    base = model.base_model if causal else model
    head = model.get_output_embeddings() if causal else None
    device = next(model.parameters()).device
    out = Features(kept_words=[0] * len(examples))
    size = [len(e) if words else sum(map(len, e)) for e in examples]
    order = np.argsort(size, kind="stable")  # similar lengths together: little padding
    started = time.perf_counter()
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch"):
            chosen = order[start:start + batch_size].tolist()
            enc = _tokenize(tokenizer, [examples[i] for i in chosen], max_length, words)
            batch = {k: v.to(device) for k, v in enc.items()}
            result = base(**batch, output_hidden_states=True)
            hidden = result.last_hidden_state  # the top layer, after any final norm
            states = result.hidden_states or (hidden,)  # a model that gives no per-layer states: its top only
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            for layer in probe_layers(len(states) - 1):
                layer_hidden = hidden if layer == len(states) - 1 else states[layer]
                pooled = ((layer_hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()
                pooled_rows = out.pooled.setdefault(layer, [None] * len(examples))
                word_rows = out.words.setdefault(layer, [None] * len(examples))
                for j, i in enumerate(chosen):
                    pooled_rows[i] = pooled[j]
                    if words:
                        word_rows[i], out.kept_words[i] = _first_subtokens(enc.word_ids(j), layer_hidden[j])
            if head is not None:
                nll, count = _next_token_nll(head, hidden, batch["input_ids"], batch["attention_mask"])
                out.nll += nll
                out.predicted += count
                out.scored_words += sum(out.kept_words[i] for i in chosen) if words else sum(
                    len(tokenizer.decode(ids[m.bool()], skip_special_tokens=True).split())
                    for ids, m in zip(batch["input_ids"], batch["attention_mask"]))
    out.seconds = time.perf_counter() - started
    return out


def _tokenize(tokenizer: Any, batch: list[Any], max_length: int, words: bool) -> Any:
    if words:
        return tokenizer(batch, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                         return_tensors="pt")
    first = [e[0] for e in batch]
    second = [e[1] for e in batch] if len(batch[0]) > 1 else None
    return tokenizer(first, second, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def _first_subtokens(word_ids: list[int | None], hidden: Any) -> tuple[np.ndarray, int]:
    first: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is not None and word not in first:
            first[word] = position
    # Words are kept in order up to the first one cut off by max length.
    kept = next((w for w in range(len(first) + 1) if w not in first), len(first))
    positions = [first[w] for w in range(kept)]
    return hidden[positions].float().cpu().numpy(), kept


def _next_token_nll(head: Any, hidden: Any, ids: Any, mask: Any, chunk: int = 1024) -> tuple[float, int]:
    """Summed cross-entropy of each real token given those before it; logits in chunks (vocabularies are large)."""
    import torch

    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    states, targets = hidden[:, :-1][keep], ids[:, 1:][keep]
    total = 0.0
    for start in range(0, len(targets), chunk):
        logits = head(states[start:start + chunk]).float()
        total += float(torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="sum"))
    return total, int(len(targets))


def _classifier() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))


def probe_classification(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> dict[str, Any]:
    """Logistic regression on frozen features, stratified k-fold: mean accuracy and macro-F1 over the folds.

    k is `folds`, or fewer when the smallest class has fewer rows (each fold needs one of every class); classes
    with a single row are left out (named in `dropped_classes`), as a fold cannot both train and test them.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_validate

    counts = np.bincount(labels)
    single = np.flatnonzero(counts == 1)
    if len(single):
        keep = ~np.isin(labels, single)
        features, labels = features[keep], labels[keep]
        counts = np.bincount(labels)
    k = min(folds, int(counts[counts > 0].min())) if counts.any() else 0
    if (counts > 0).sum() < 2 or k < 2:
        return {"error": "a probe needs two classes with at least 2 examples each"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_validate(_classifier(), features, labels, scoring=("accuracy", "f1_macro"),
                                cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    return {"metric": "accuracy", "score": float(scores["test_accuracy"].mean()),
            "std": float(scores["test_accuracy"].std()), "macro_f1": float(scores["test_f1_macro"].mean()),
            "folds": k, "examples": int(len(labels)), **({"dropped_classes": single.tolist()} if len(single) else {})}


def probe_regression(features: np.ndarray, targets: np.ndarray, folds: int, seed: int) -> dict[str, Any]:
    """Ridge regression (its strength chosen inside each training fold) on frozen features, k-fold: mean Spearman
    (over targets, then folds), with Pearson beside it."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lmtune.evaluation.correlation import pearson, spearman

    targets = targets.reshape(len(targets), -1)
    k = min(folds, len(targets))
    if k < 2 or len(targets) < 4:
        return {"error": "a probe needs at least 4 examples"}
    rho, r = [], []
    for train, test in KFold(k, shuffle=True, random_state=seed).split(features):
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        predicted = model.fit(features[train], targets[train]).predict(features[test]).reshape(len(test), -1)
        rho.append(np.mean([spearman(predicted[:, j], targets[test, j]) for j in range(targets.shape[1])]))
        r.append(np.mean([pearson(predicted[:, j], targets[test, j]) for j in range(targets.shape[1])]))
    return {"metric": "spearman", "score": float(np.mean(rho)), "std": float(np.std(rho)),
            "pearson": float(np.mean(r)), "folds": k, "examples": int(len(targets))}


def probe_ner(word_features: list[np.ndarray], word_tags: list[list[int]], outside: int, folds: int) -> dict[str, Any]:
    """Logistic regression over the tags of single words (first sub-token features), folds by whole sentences.

    Score: macro-F1 over the entity tags (B-/I- of each type; O excluded, since it dominates) of the
    out-of-fold predictions, per word; word accuracy (O included) alongside.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    rows = [(f, t[: len(f)], i) for i, (f, t) in enumerate(zip(word_features, word_tags)) if len(f)]
    k = min(folds, len(rows))
    x = np.concatenate([f for f, _, _ in rows]) if rows else np.zeros((0, 1))
    y = np.concatenate([np.asarray(t, dtype=np.int64) for _, t, _ in rows]) if rows else np.zeros(0, np.int64)
    entity = sorted(set(y.tolist()) - {outside})
    if k < 2 or not entity:
        return {"error": "a probe needs at least 2 sentences and one entity"}
    groups = np.concatenate([np.full(len(f), i) for f, _, i in rows])
    # Every training fold needs words of two tags: no more folds than sentences holding an entity.
    k = min(k, len({i for _, t, i in rows if set(t) - {outside}}))
    if k < 2:
        return {"error": "a probe needs entities in at least 2 sentences"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            predicted = cross_val_predict(_classifier(), x, y, groups=groups, cv=GroupKFold(k))
        except ValueError as err:  # a training fold with a single tag (the entities fell in one fold)
            return {"error": f"the probe could not be fitted on these folds ({err})"}
    return {"metric": "entity-tag macro-F1", "score": float(f1_score(y, predicted, labels=entity, average="macro",
                                                                     zero_division=0)),
            "word_accuracy": float(accuracy_score(y, predicted)), "folds": k, "examples": len(rows),
            "words": int(len(y))}
