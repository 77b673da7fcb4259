"""Head on a frozen backbone, with and without the feature cache, same config: accuracy and time.

    python benchmarks/head_cache.py examples/sst2.yaml --epochs 10 --set data.max_train_samples=null ...

Both runs train the same head for the same epochs with evaluation each epoch; the cached run runs the
backbone once over train and validation, the other runs it on every batch (backbone dropout off in
neither: the cached features come from eval mode, the plain path keeps the backbone in train mode).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import lmtune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides for both runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {}
    for cache in (True, False):
        overrides = args.set + ["method.name=head", f"method.lr={args.lr}", f"method.cache_features={cache}",
                                f"train.epochs={args.epochs}", f"output.name=head-cache-{cache}",
                                "output.overwrite=true"]
        started = time.perf_counter()
        m = lmtune.train(args.config, overrides).metrics
        split = "test" if "test" in m else "validation"
        results[cache] = {"accuracy": m[split]["accuracy"], "split": split, "train_seconds": m["train_seconds"],
                          "wall_seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps({"cache": cache, **results[cache]}), flush=True)
    on, off = results[True], results[False]
    print(f"| features | {on['split']} accuracy | train s (incl. caching) | whole run s |")
    print("|---|---|---|---|")
    for name, r in (("cached", on), ("backbone every step", off)):
        print(f"| {name} | {r['accuracy']:.4f} | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} |")
    print(f"speed-up (train): {off['train_seconds'] / on['train_seconds']:.1f}x; "
          f"accuracy difference: {100 * (on['accuracy'] - off['accuracy']):+.2f} points")


if __name__ == "__main__":
    main()
