"""Domain adaptation: continued pre-training of a causal LM on raw text, packed, scored by perplexity."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any, Iterable, Literal

from lmtune.data import DataError
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
        if "replay" not in ds.column_names:
            return lm_common.encode_documents(ds["text"][:], tokenizer, max_length)
        flags = ds["replay"][:]
        texts = ds["text"][:]
        task = lm_common.tokenize_documents([t for t, r in zip(texts, flags) if not r], tokenizer)
        replay = lm_common.tokenize_documents([t for t, r in zip(texts, flags) if r], tokenizer)
        task_tokens = sum(map(len, task))
        chosen = lm_common.choose_replay(task_tokens, replay, self.data.replay.ratio, self.seed)
        replay_tokens = sum(map(len, chosen))
        self.encode_report["replay"] = {"documents": len(chosen), "tokens": replay_tokens, "task_tokens": task_tokens,
                                        "share": round(replay_tokens / max(1, replay_tokens + task_tokens), 4)}
        log.info("data.replay: %d general-text documents (%d tokens, %.1f%% of training tokens) mixed in",
                 len(chosen), replay_tokens, 100 * self.encode_report["replay"]["share"])
        docs = task + chosen
        random.Random(self.seed).shuffle(docs)  # replay spread through the rows, not all at the end
        return lm_common.packed_dataset(docs, max_length)

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
