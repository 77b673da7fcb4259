"""Two processes (torchrun, gloo on CPU): data is sharded, evaluation sees every row, one run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def test_two_process_run_shards_training_and_gathers_evaluation(tiny_config: dict, tmp_path: Path) -> None:
    tiny_config["train"].update(batch_size=4, epochs=2)
    tiny_config["output"].pop("name")
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    # CPU processes (gloo) even where a GPU exists: two ranks cannot share one GPU under NCCL.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "lmtune.cli", "train", str(config)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1  # both processes agreed on one run directory
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["steps"] == 2 * (72 // 4 // 2)  # each process takes half of the 18 batches per epoch
    assert sum(map(sum, metrics["validation"]["confusion_matrix"])) == 24  # all rows, gathered
    assert metrics["validation"]["accuracy"] > 0.8
    assert proc.stderr.count("resolved config") == 1  # only the main process prints
