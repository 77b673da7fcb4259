"""Shared by the causal-LM tasks: batching token rows, perplexity, generation and scoring of generations."""

from __future__ import annotations

import functools
import logging
import math
import re
import string
from typing import Any, Callable, Iterable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

from lmtune.data.padding import batch_width
from lmtune.data.store import tokenize_documents
from lmtune.data.text import pack
from lmtune.tasks.base import Task

log = logging.getLogger("lmtune")


class GenerationOptions(BaseModel):
    """Options of `lmtune predict` / generation-based evaluation, shared by the causal-LM tasks."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    max_new_tokens: int = 64
    """Generation: the most tokens generated per input (it stops earlier at EOS / end of turn)."""
    do_sample: bool = False
    """Generation: sample (with temperature / top_p) instead of greedy decoding."""
    temperature: float = 1.0
    """Generation with do_sample: softmax temperature."""
    top_p: float = 1.0
    """Generation with do_sample: nucleus sampling mass."""
    generation_batch_size: int = 16
    """Generation: prompts per batch (left padded)."""


class DecoderOptions(GenerationOptions):
    """Options shared by the causal-LM tasks."""

    loss_chunk: int | None = 2048
    """Training loss over the vocabulary this many tokens at a time (memory-lean: never all logits at once; see
    lmtune.tasks.lm_loss); null = the model's own loss over full logits."""

    @model_validator(mode="after")
    def _check_chunk(self) -> "DecoderOptions":
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise ValueError(f"task.loss_chunk={self.loss_chunk}: must be at least 1 (or null)")
        return self


def count_targets(batch: dict) -> torch.Tensor:
    """Tokens the causal-LM loss counts in a batch: labels are shifted by one inside the model."""
    return (batch["labels"][:, 1:] != -100).sum()


def greater_is_better(metric: str) -> bool:
    return not any(word in metric for word in ("loss", "perplexity"))


class DecoderTask(Task):
    """What the causal-LM tasks (causal_lm, instruct) share: the model class, the loss and its metric."""

    default_metric = "perplexity"
    metric_names = ("loss", "perplexity")
    cross_entropy_targets: list[tuple[str, str]] = []  # the loss is over shifted tokens: no smoothing here
    mixes_replay = True  # data.replay: general text mixed into training (other tasks refuse it)
    generates = True  # predictions continue the prompt
    pipeline_tag = "text-generation"
    greater_is_better = staticmethod(greater_is_better)
    count_targets = staticmethod(count_targets)

    @property
    def auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def prepare_model(self, model: Any) -> None:
        """Before training (after a method has wrapped the model): no key/value cache (a training forward would
        fill one for nothing, and compiled layers would recompile for each layer's entry), and the memory-lean
        loss (task.loss_chunk) where the model allows it. `release_model` undoes both."""
        from lmtune.tasks import lm_loss

        undo: Any = None
        if self.options.loss_chunk is not None:
            undo = lm_loss.install(model, self.options.loss_chunk)
            if isinstance(undo, str):
                log.warning("task.loss_chunk: the model's own loss is used: %s", undo)
                undo = None
        self._prepared = (model.config, model.config.use_cache, undo)
        model.config.use_cache = False

    def release_model(self) -> None:
        """After training: the model's own cache setting and loss (evaluation and generation need neither change)."""
        config, use_cache, undo = self._prepared
        config.use_cache = use_cache
        if undo is not None:
            undo()


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


def encode_documents(texts: list[str], tokenizer: Any, max_length: int) -> Any:
    """Packed rows (input_ids, position_ids, length) of documents; see `lmtune.data.text.pack`."""
    return packed_dataset(tokenize_documents(texts, tokenizer), max_length)


def packed_dataset(docs: list[list[int]], max_length: int) -> Any:
    import datasets

    rows = pack(docs, max_length)
    return datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                       "position_ids": [r["position_ids"] for r in rows],
                                       "length": [len(r["input_ids"]) for r in rows]})


def read_splits(read: Callable[[str, list[str]], Any], cfg: Any, seed: int) -> tuple[dict[str, Any], Any, dict]:
    """Train read by `read(path, skipped)`; test and validation read or split off it, then the row caps: the one
    outline every task follows (`data.carve_splits`), here without labels to stratify on.

    Returns (test/validation splits, train, skipped row descriptions per split)."""
    from lmtune.data import DataError
    from lmtune.data.splits import carve_splits

    if not cfg.train:
        raise DataError("data.train", "no training file given (set data.train)")
    if cfg.split_by:
        raise DataError("data.split_by", "this task splits documents off at random; splitting by group is for "
                                         "classification, NER and QA (set data.validation / data.test files instead)")
    skipped: dict[str, list[str]] = {"train": []}
    train = read(cfg.train, skipped["train"])
    train, splits = carve_splits(train, cfg, seed, lambda name, path: read(path, skipped.setdefault(name, [])), {})
    return splits, train, skipped


def choose_replay(task_tokens: int, sizes: Any, ratio: float, seed: int) -> np.ndarray:
    """Indices of replay documents (of the given token counts), in seeded random order, until they hold `ratio` of
    all training tokens; numpy throughout, so a corpus of millions of documents costs arrays, not Python objects.

    A replay file smaller than that share is gone through again (a fresh order each pass), as a second
    epoch over it would be; the number of passes is logged."""
    sizes = np.fromiter(sizes, dtype=np.int64) if not hasattr(sizes, "__len__") else np.asarray(sizes, np.int64)
    wanted = ratio / (1 - ratio) * task_tokens
    if not sizes.any():
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen, total, passes = [], 0, 0
    while total < wanted:
        order = rng.permutation(len(sizes))
        passes += 1
        reached = np.cumsum(sizes[order])
        take = min(int(np.searchsorted(reached, wanted - total, side="left")) + 1, len(order))  # until >= wanted
        chosen.append(order[:take])
        total += int(reached[take - 1])
    if passes > 1:
        log.warning("data.replay: its file holds %d tokens, fewer than the %d a ratio of %.2f asks for; "
                    "its documents are used %.1f times over", int(sizes.sum()), int(wanted), ratio,
                    total / int(sizes.sum()))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def collate_rows(tokenizer: Any, pad_to_multiple_of: int,
                 max_width: int | None = None) -> Callable[[list[dict]], dict]:
    """Batches of token rows, right padded; rows may carry `position_ids` (packed documents) and `labels`.

    Packed rows get a 4D block-diagonal causal mask [B, 1, L, L] (True = may attend) built from their
    position ids, which restart at every document: no token attends across a document boundary.
    (transformers 5 passes a 4D mask through unchanged; its own detection of packing from position ids
    alone did not separate documents under SDPA, see tests/tasks/test_causal_lm.py.) Padding is one more
    segment. Without labels, a row's labels are its input ids with -100 at every document start (the first
    token of a document is not predicted from the previous document) and on padding."""
    pad = pad_id(tokenizer)

    def collate(rows: list[dict]) -> dict:
        longest = max(len(r["input_ids"]) for r in rows)
        width = batch_width(longest, pad_to_multiple_of, max_width)
        packed = "position_ids" in rows[0]
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            mask[i, :n] = 1
            if packed:
                positions[i, :n] = torch.tensor(row["position_ids"])
                positions[i, n:] = torch.arange(width - n)
            if "labels" in row:  # (packed labelled rows mask each example's first token themselves)
                labels[i, :n] = torch.tensor(row["labels"])
            else:
                labels[i, :n] = ids[i, :n]
                if packed:
                    labels[i, :n][positions[i, :n] == 0] = -100
        if packed:
            segments = (positions == 0).cumsum(-1)
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            blocks = (segments[:, :, None] == segments[:, None, :]) & causal
            return {"input_ids": ids, "position_ids": positions, "attention_mask": blocks[:, None], "labels": labels}
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def perplexity(outputs: Iterable[tuple[list[int], Any, dict]]) -> dict[str, float]:
    """exp(mean token NLL) over every target token: summed token losses, not a mean of batch means."""
    total, tokens = 0.0, 0
    for _, out, batch in outputs:
        n = int(count_targets(batch))
        if n:
            total += float(out.loss) * n
            tokens += n
    if not tokens:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and, where the vocabulary has one, the chat end-of-turn token: generation stops at either."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids


def generate(model: Any, tokenizer: Any, prompts: list[str], options: GenerationOptions,
             device: Any) -> list[str]:
    """Continuations of `prompts` (already formatted), batched with left padding; special tokens dropped."""
    texts: list[str] = []
    side, cut, pad = tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # generated tokens must follow each prompt directly
    tokenizer.truncation_side = "left"  # a prompt too long for the model keeps its end, where the answer follows
    room = _prompt_room(model, options.max_new_tokens)
    if pad is None:  # GPT-2 and others have no pad token: pad with EOS (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer)
    sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p} \
        if options.do_sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    try:
        for start in range(0, len(prompts), options.generation_batch_size):
            chunk = prompts[start:start + options.generation_batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False,
                            truncation=room is not None, max_length=room).to(device)
            if room is not None and enc["input_ids"].shape[1] == room:
                long = sum(len(ids) > room for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"])
                if long:
                    log.warning("%d prompt(s) longer than the %d tokens the model's %d positions leave beside "
                                "max_new_tokens=%d: their beginnings were cut", long, room, room +
                                options.max_new_tokens, options.max_new_tokens)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=options.max_new_tokens, eos_token_id=stops,
                                     pad_token_id=pad_id(tokenizer), **sampling)
            new = out[:, enc["input_ids"].shape[1]:]
            texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, cut
        if pad is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return texts


def _prompt_room(model: Any, max_new_tokens: int) -> int | None:
    """Prompt tokens the model's positions hold beside `max_new_tokens` (None where it names no limit)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not positions:
        return None
    if positions <= max_new_tokens:
        raise ValueError(f"max_new_tokens={max_new_tokens}: the model has {positions} positions in all, prompt "
                         "included; ask for fewer")
    return positions - max_new_tokens


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: what exact match compares."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def pick_choice(text: str, choices: list[str]) -> str | None:
    """The choice whose words occur earliest in a generation (classification-style prompts)."""
    padded = f" {normalise(text)} "
    found = [(padded.find(f" {normalise(c)} "), c) for c in choices]
    found = [(pos, -len(c), c) for pos, c in found if pos >= 0]  # at one place the longer choice ("good movie")
    return min(found)[2] if found else None


def score_generations(generations: list[str], references: list[str], choices: list[str] | None) -> dict[str, Any]:
    """Exact match after normalisation, or (with choices) accuracy of the first choice named."""
    if choices:
        picked = [pick_choice(g, choices) for g in generations]
        hits = [p is not None and normalise(p) == normalise(r) for p, r in zip(picked, references)]
        unparsed = sum(p is None for p in picked)
        return {"accuracy": sum(hits) / max(1, len(hits)), "no_choice_rate": unparsed / max(1, len(hits)),
                "examples": len(hits)}
    hits = [normalise(g) == normalise(r) for g, r in zip(generations, references)]
    return {"exact_match": sum(hits) / max(1, len(hits)), "examples": len(hits)}


def text_perplexity(model: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int,
                    accelerator: Any) -> dict[str, float]:
    """Perplexity of `model` on documents packed as in training (the forgetting probe)."""
    from lmtune.training.loop import iterate_outputs

    features = encode_documents(texts, tokenizer, max_length)
    return perplexity(iterate_outputs(model, features, collate_rows(tokenizer, 8), batch_size, accelerator,
                                      width=functools.partial(batch_width, multiple=8)))
