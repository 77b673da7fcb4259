"""Domain adaptation with and without replay: domain perplexity and general-text perplexity, before and after.

    python benchmarks/domain_adaptation.py examples/imdb_domain.yaml \
        --replay ../shared/data/wikitext2/wiki.valid.tokens --ratio 0.1 --set data.train=... data.test=...

Measures the untuned model's perplexity on the config's held-out domain texts (its test split), then trains
the config twice (without replay, and with `data.replay` = the given general text at the given ratio) and
prints one table: domain perplexity before/after and general-text perplexity (`eval.general_text`, the
forgetting probe; the config must set it) before/after for both runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import lmtune


def untuned_perplexity(cfg: Any) -> float:
    """Perplexity of the pretrained model on the test split, measured as the run measures it after training."""
    from lmtune import models
    from lmtune.tasks import TASKS
    from lmtune.session import make_accelerator
    from lmtune.tasks.lm_common import text_perplexity

    task = TASKS[cfg.task.name](cfg.task, cfg.data)
    splits, _ = task.load_splits(cfg.train.seed)
    accelerator = make_accelerator(cfg.train.precision)
    tokenizer = models.load_tokenizer(cfg.model)
    model, _ = models.load_model(task.auto_class, cfg.model)
    model.to(accelerator.device)
    return text_perplexity(model, tokenizer, splits["test"]["text"][:], models.max_length(cfg.model, tokenizer,
                                                                                           model.config),
                           cfg.eval.batch_size or 2 * cfg.train.batch_size, accelerator)["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--replay", required=True, help="general text mixed in by the second run")
    parser.add_argument("--ratio", type=float, default=0.1, help="its share of the training tokens")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from lmtune.config import load_config

    cfg = load_config(args.config, args.set)
    if not cfg.eval.general_text:
        parser.error("the config needs eval.general_text (the general-domain text measured before and after)")
    before = untuned_perplexity(cfg)
    print(json.dumps({"run": "untuned", "domain_perplexity": before}), flush=True)
    rows = []
    for name, extra in (("no replay", []), (f"replay {args.ratio:g}", [f"data.replay.path={args.replay}",
                                                                         f"data.replay.ratio={args.ratio}"])):
        m = lmtune.train(args.config, args.set + extra + [f"output.name=domain-{name.replace(' ', '-')}",
                                                          "output.overwrite=true"]).metrics
        row = {"run": name, "domain_before": before, "domain_after": m["test"]["perplexity"],
               "general_before": m["forgetting"]["perplexity_before"],
               "general_after": m["forgetting"]["perplexity_after"],
               "replay_share": m["data"].get("replay", {}).get("share", 0.0), "steps": m["steps"],
               "train_seconds": m["train_seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| run | replay share of tokens | domain ppl before | after | change | general ppl before | after | change |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['replay_share']:.3f} | {r['domain_before']:.2f} | {r['domain_after']:.2f} | "
              f"{100 * (r['domain_after'] / r['domain_before'] - 1):+.1f}% | {r['general_before']:.2f} | "
              f"{r['general_after']:.2f} | {100 * (r['general_after'] / r['general_before'] - 1):+.1f}% |")


if __name__ == "__main__":
    main()
