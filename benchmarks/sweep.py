"""Run one config under a grid of overrides and print a table of the final metrics (one process).

    python benchmarks/sweep.py examples/drugreview.yaml --grid train.lr=5e-5,1e-4 train.epochs=4,8 \
        --set model.name=/path/to/model --out sweep.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import time
from pathlib import Path

import lmtune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--grid", nargs="*", default=[], help="key=v1,v2,... (every combination is run)")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides shared by every run")
    parser.add_argument("--out", default=None, help="append one JSON line per run here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    axes = [(k, v.split(",")) for k, v in (item.split("=", 1) for item in args.grid)]
    rows = []
    for index, values in enumerate(itertools.product(*[vals for _, vals in axes])):
        overrides = args.set + [f"{k}={v}" for (k, _), v in zip(axes, values)] + ["output.overwrite=true"]
        # Values may be paths (model.name=/a/b): the run folder takes their last part, file-name safe, after the
        # run's number (two paths may end alike).
        name = f"sweep{index}-" + "-".join(re.sub(r"[^\w.=-]+", "_", Path(v).name) for v in values)
        started = time.perf_counter()
        m = lmtune.train(args.config, overrides + [f"output.name={name}"]).metrics
        row = {"overrides": dict(zip([k for k, _ in axes], values)),
               **{f"{split}/{k}": v for split in ("validation", "test") for k, v in m.get(split, {}).items()
                  if isinstance(v, float)},
               "train_seconds": m["train_seconds"], "wall_seconds": round(time.perf_counter() - started, 1),
               "tokens_per_second": m["train_tokens_per_second"], "best_step": m["selection"]["best_step"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    keys = [k for k in rows[0] if k != "overrides"] if rows else []
    print("| " + " | ".join([k for k, _ in axes] + keys) + " |")
    for row in rows:
        cells = list(row["overrides"].values()) + [f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k])
                                                    for k in keys]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
