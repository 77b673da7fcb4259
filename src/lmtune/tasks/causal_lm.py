"""Domain adaptation: continued pre-training of a causal LM on raw text, packed, scored by perplexity."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np

from lmtune.data import DataError, store
from lmtune.data.text import read_documents
from lmtune.registry import register_task
import lmtune.tasks.lm_common as lm_common
from lmtune.tasks.lm_common import DecoderOptions

if TYPE_CHECKING:
    from lmtune.config import DataConfig

log = logging.getLogger("lmtune")


class CausalLMOptions(DecoderOptions):
    name: Literal["causal_lm"] = "causal_lm"
    """Continue pre-training a decoder on raw text (domain adaptation); metric: perplexity."""
    documents: Literal["line", "blank_line"] = "line"
    """In .txt files: one document per line, or documents separated by blank lines."""


@register_task("causal_lm")
class CausalLM(lm_common.DecoderTask):
    Options = CausalLMOptions

    def __init__(self, options: CausalLMOptions, data: DataConfig, labels: list[str] | None = None):
        self.options, self.data = options, data
        self.seed = 0
        self.encode_report: dict[str, Any] = {}

    # ---- data ------------------------------------------------------------------------------------
    def _read(self, path: str, skipped: list[str] | None = None) -> Any:
        return read_documents(path, self.data.text_column, self.options.documents, self.data.format,
                              self.data.on_bad_rows, skipped)

    def load_splits(self, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = self.data
        self.seed = seed
        splits, train, skipped = lm_common.read_splits(self._read, cfg, seed)
        if cfg.replay:
            replay = read_documents(cfg.replay.path, documents=self.options.documents)
            train = train.add_column("replay", [False] * len(train))
            import datasets

            train = datasets.concatenate_datasets([train, replay.add_column("replay", [True] * len(replay))])
        splits["train"] = train
        report = {"rows": {k: len(v) for k, v in splits.items()}, "unit": "documents",
                  "skipped_rows": {k: len(v) for k, v in skipped.items()},
                  "skipped_examples": [m for v in skipped.values() for m in v][:20]}
        return splits, report

    def load_eval_file(self, path: str) -> Any:
        return self._read(path)

    def from_texts(self, records: list[Any]) -> list[str]:
        """Prompts to continue: strings, or dicts with `text`."""
        prompts = []
        for i, r in enumerate(records, 1):
            text = r.get("text") if isinstance(r, dict) else r
            if not isinstance(text, str) or not text.strip():
                raise DataError("input", "empty or missing prompt text", row=i, field="text")
            prompts.append(text)
        return prompts

    # ---- features --------------------------------------------------------------------------------
    def encode(self, ds: Any, tokenizer: Any, max_length: int) -> Any:
        """Packed rows of the documents, tokenized into the on-disk store and packed from it (lmtune.data.store)."""
        if "replay" not in ds.column_names:
            return store.packed(store.tokenize(ds, tokenizer), max_length)
        tokens = store.tokenize(ds, tokenizer, keep=("replay",))
        flags = tokens.data.column("replay").to_numpy(zero_copy_only=False).astype(bool)
        sizes = store.lengths(tokens)
        task, replay = np.flatnonzero(~flags), np.flatnonzero(flags)
        task_tokens = int(sizes[task].sum())
        chosen = replay[lm_common.choose_replay(task_tokens, sizes[replay], self.data.replay.ratio, self.seed)]
        replay_tokens = int(sizes[chosen].sum())
        self.encode_report["replay"] = {"documents": len(chosen), "tokens": replay_tokens, "task_tokens": task_tokens,
                                        "share": round(replay_tokens / max(1, replay_tokens + task_tokens), 4)}
        log.info("data.replay: %d general-text documents (%d tokens, %.1f%% of training tokens) mixed in",
                 len(chosen), replay_tokens, 100 * self.encode_report["replay"]["share"])
        # replay spread through the rows, not all at the end (arrays: a corpus of millions of documents)
        order = np.random.default_rng(self.seed).permutation(np.concatenate([task, chosen]))
        return store.packed(tokens, max_length, order)

    def collate(self, tokenizer: Any, pad_to_multiple_of: int, max_width: int | None = None) -> Any:
        return lm_common.collate_rows(tokenizer, pad_to_multiple_of, max_width)

    # ---- outputs ---------------------------------------------------------------------------------
    def evaluate(self, outputs: Iterable, features: Any, examples: Any = None
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        scalars = lm_common.perplexity(outputs)
        tokens = scalars.pop("tokens")
        return scalars, {"tokens": tokens}

    def generate(self, model: Any, tokenizer: Any, inputs: list[str], device: Any) -> list[dict[str, Any]]:
        texts = lm_common.generate(model, tokenizer, inputs, self.options, device)
        return [{"generated": t} for t in texts]
