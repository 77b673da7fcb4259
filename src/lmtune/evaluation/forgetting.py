"""Forgetting probes: how much general ability a run lost, measured before training and again after."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from lmtune.config import EvalConfig

log = logging.getLogger("lmtune")


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
