"""Forgetting probes: how much general ability a run lost, measured before training and again after."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from lmtune.config import EvalConfig

log = logging.getLogger("lmtune")
SAMPLES = 5  # general_chat conversations answered by greedy generation before and after training


def general_text_probe(cfg: EvalConfig, session: Any) -> Callable[[], dict[str, Any]] | None:
    """Perplexity on general text now (before training); the returned call measures it again after."""
    if not cfg.general_text:
        return None
    from lmtune.data.text import read_documents
    from lmtune.tasks.lm_common import text_perplexity

    texts = read_documents(cfg.general_text)["text"][:cfg.general_text_max_documents]

    def measure() -> float:
        return text_perplexity(session.model, session.tokenizer, texts, session.max_length, session.batch_size,
                               session.accelerator)["perplexity"]

    before = measure()
    log.info("forgetting probe: perplexity on %s before training: %.3f", cfg.general_text, before)

    def after() -> dict[str, Any]:
        value = measure()
        change = (value - before) / before
        log.info("forgetting probe: perplexity on %s %.3f before, %.3f after training (%+.1f%%)",
                 cfg.general_text, before, value, 100 * change)
        return {"general_text": cfg.general_text, "documents": len(texts), "perplexity_before": before,
                "perplexity_after": value, "relative_change": change}

    return after


def reference_probe(cfg: EvalConfig, session: Any, seed: int) -> Callable[[], dict[str, Any]] | None:
    """Encoders: a linear probe on the backbone's frozen features for a labelled reference task (as `lmtune select`
    fits it), scored now (before training); the returned call scores it again on the tuned backbone."""
    if cfg.reference_probe is None:
        return None
    spec = cfg.reference_probe
    inputs, targets, outside, words = _reference_rows(spec, seed)
    file = spec.data["train"]

    def score() -> dict[str, Any]:
        from lmtune.evaluation import probe

        backbone, tokenizer = _backbone(session.model), session.tokenizer
        was_training, side, pad = backbone.training, tokenizer.padding_side, tokenizer.pad_token
        backbone.eval()  # no dropout: the same backbone gives the same features
        try:
            with session.accelerator.autocast():  # before and after alike, in the precision the run computes in
                feats = probe.extract(backbone, tokenizer, inputs, session.max_length, words=words,
                                      desc="reference probe")
        finally:  # the probe pads its own way: the run's tokenizer (saved with the model) stays as it was
            backbone.train(was_training)
            tokenizer.padding_side, tokenizer.pad_token = side, pad
        top = max(feats.pooled)  # the top layer: what the task head reads, and what tuning moves most
        if words:
            return {**probe.probe_ner(feats.words[top], targets, outside, spec.folds), "layer": top}
        return {**probe.probe_classification(np.stack(feats.pooled[top]), targets, spec.folds, seed), "layer": top}

    before = score()
    if "error" in before:
        raise ValueError(f"eval.reference_probe: {file}: {before['error']}")
    log.info("reference probe (%s on %s): %s %.4f before training", spec.task.get("name", "classification"), file,
             before["metric"], before["score"])

    def after() -> dict[str, Any]:
        now = score()
        if "error" in now:  # e.g. a diverged backbone's features: said, and the run still saves its model
            log.warning("reference probe after training: %s", now["error"])
            return {"reference_probe_before": before["score"],
                    "reference_probe": {"data": file, "metric": before["metric"], "error": now["error"]}}
        drop = before["score"] - now["score"]
        log.info("reference probe: %s %.4f before, %.4f after training (drop %+.4f)", before["metric"],
                 before["score"], now["score"], drop)
        return {"reference_probe_before": before["score"], "reference_probe_after": now["score"],
                "reference_probe_drop": drop,
                "reference_probe": {"data": file, "task": spec.task.get("name", "classification"),
                                    "metric": before["metric"], "layer": before["layer"],
                                    "examples": before["examples"], "folds": before["folds"],
                                    "before": before, "after": now}}

    return after


def general_chat_probe(cfg: EvalConfig, session: Any, seed: int) -> Callable[[], dict[str, Any]] | None:
    """Decoders: the per-token loss of reference replies (eval.general_chat: conversations the run does not train
    on) under the chat template, reply tokens only, now; the returned call measures it again after training. The
    first conversations are also answered by greedy generation before and after, for a person to read."""
    if not cfg.general_chat:
        return None
    from lmtune.config import DataConfig
    from lmtune.registry import TASKS
    from lmtune.session import Session

    kind = TASKS["instruct"]
    options = kind.Options(name="instruct")
    if session.cfg.task.name == "instruct":  # the run's chat settings; its prompt template is for its own rows only
        options = session.task.options.model_copy(update={"prompt_template": None, "answer_choices": None,
                                                          "eval_generate": False, "packing": False})
    task = kind(options, DataConfig(train=cfg.general_chat, validation_size=0, test_size=0))
    rows = task.load_splits(seed)[0]["train"]
    rows = rows.select(range(min(len(rows), cfg.general_chat_max_examples)))
    probe = Session(session.cfg, task, session.tokenizer, session.model, session.accelerator)
    features = probe.encode(rows)
    shown = [task.split_prompt(m) for m in rows["messages"][:SAMPLES]]

    def measure() -> tuple[float, list[str]]:
        probe.model = session.model  # the tuned model once training is over
        loss = probe.evaluate(features)[0]["loss"]
        replies = probe.generate([p for p, _ in shown])  # under the run's autocast, as training and evaluation
        return loss, [r["generated"] for r in replies]

    before, said = measure()
    log.info("forgetting probe: reply loss on %s before training: %.4f", cfg.general_chat, before)

    def after() -> dict[str, Any]:
        loss, now = measure()
        log.info("forgetting probe: reply loss on %s %.4f before, %.4f after training (%+.4f)", cfg.general_chat,
                 before, loss, loss - before)
        return {"general_chat_loss_before": before, "general_chat_loss_after": loss,
                "general_chat_loss_change": loss - before,
                "general_chat": {"data": cfg.general_chat, "conversations": len(features),
                                 "samples": [{"prompt": p[-1]["content"], "reference": r, "before": b, "after": a}
                                             for (p, r), b, a in zip(shown, said, now)]}}

    return after


def forgetting_probes(cfg: EvalConfig, session: Any, seed: int) -> Callable[[], dict[str, Any]] | None:
    """The configured forgetting probes measured now; the returned call measures them again (one `forgetting`
    section: general-text perplexity, general-chat reply loss, the reference probe)."""
    probes = [p for p in (general_text_probe(cfg, session), general_chat_probe(cfg, session, seed),
                          reference_probe(cfg, session, seed)) if p is not None]
    if not probes:
        return None
    return lambda: {k: v for p in probes for k, v in p().items()}


def _backbone(model: Any) -> Any:
    """The transformer under the task head (and under a peft wrapper, its adapters active)."""
    from lmtune.models import is_adapter

    return (model.get_base_model() if is_adapter(model) else model).base_model


def _reference_rows(spec: Any, seed: int) -> tuple[list[Any], Any, int, bool]:
    """The reference file read as its task reads it, sampled: (inputs, targets, index of NER's O tag, words?)."""
    from lmtune.config import DataConfig
    from lmtune.data import stratified_subset
    from lmtune.registry import TASKS

    name = spec.task.get("name", "classification")
    data = DataConfig.model_validate({"validation_size": 0, "test_size": 0, **spec.data})
    task = TASKS[name](TASKS[name].Options.model_validate({"name": name, **spec.task}), data)
    rows = task.load_splits(seed)[0]["train"]
    if name == "ner":
        rows = rows.shuffle(seed=seed).select(range(min(len(rows), spec.max_examples)))
        index = {tag: i for i, tag in enumerate(task.labels)}
        return ([list(t) for t in rows["tokens"][:]], [[index[t] for t in tags] for tags in rows["tags"][:]],
                index.get("O", -1), True)
    if "label_key" not in rows.column_names:
        raise ValueError("eval.reference_probe: a multi-label reference task has no probe; give one label a row")
    rows = stratified_subset(rows, spec.max_examples, seed, "label_key")
    index = {label: i for i, label in enumerate(task.labels)}
    pairs = rows["text_pair"][:] if "text_pair" in rows.column_names else [None] * len(rows)
    inputs = [(t,) if p is None else (t, p) for t, p in zip(rows["text"][:], pairs)]
    return inputs, np.array([index[v] for v in rows["label_key"][:]]), -1, False
