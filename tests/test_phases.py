"""phase_seconds: where a whole `lmtune train` process goes, phase by phase, adding up to its wall time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def test_phases_add_up_to_the_process_wall_time(tiny_config: dict, tmp_path: Path) -> None:
    tiny_config["train"].update(epochs=2, eval_every=4)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "lmtune.cli", "train", str(config)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}, timeout=300)
    wall = time.time() - started
    assert done.returncode == 0, done.stderr
    phases = json.loads((Path(tiny_config["output"]["dir"]) / "tiny" / "metrics.json").read_text())["phase_seconds"]
    for name in ("start-up", "config and preflight", "data read and checks", "model load", "tokenization",
                 "training", "evaluation", "checkpoints", "final evaluation", "save", "plots and report", "summary"):
        assert phases[name] >= 0, (name, phases)
    assert phases["start-up"] > 0.5 and phases["training"] > 0 and phases["evaluation"] > 0, phases
    parts = sum(v for k, v in phases.items() if k != "total")
    assert abs(parts - phases["total"]) < 0.05
    # what is not counted: the interpreter's exit after the last line, and the start of the child process
    assert phases["total"] <= wall and phases["total"] >= 0.9 * wall - 0.5, (phases, wall)
    assert "whole run" in done.stderr and "training" in done.stderr
