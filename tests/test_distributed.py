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


def test_a_two_process_checkpoint_resumes_in_one_process(tiny_config: dict, tmp_path: Path) -> None:
    """Written by two processes, resumed by one: the position in the epoch and the step count are carried over into
    the one process's batches, and the run ends after exactly the one-process run's steps."""
    import signal
    import time

    from helpers import make_sentiment_rows, write_csv

    tiny_config["data"]["train"] = str(write_csv(tmp_path / "big.csv", make_sentiment_rows(400, seed=3)))
    tiny_config["train"].update(batch_size=4, epochs=4, eval_every=5)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "lmtune.cli", "train", str(config)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    saved = tmp_path / "runs" / "tiny" / "checkpoints" / "last" / "loop_state.json"
    deadline = time.time() + 200
    while not saved.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    state = json.loads(saved.read_text())
    assert state["world_size"] == 2 and 0 < state["step"] < 2 * 37  # two processes: 37 steps an epoch
    resumed = subprocess.run([sys.executable, "-m", "lmtune.cli", "train", str(config), "--resume"],
                             capture_output=True, text=True, env={**env, "COLUMNS": "300"}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = " ".join(resumed.stderr.split())
    assert "written by 2 process(es) and is resumed by 1" in said
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    # One process: 300 rows / 4 a batch = 75 steps an epoch, 300 in the stage; the checkpoint's position (epoch e,
    # batch b of 37 a process) is step 75e + 2b of them, and the run's counter adds the steps still to take.
    assert metrics["stages"]["full"]["steps"] == 4 * 75
    assert metrics["steps"] == state["step"] + 4 * 75 - (75 * state["epoch"] + 2 * state["batch"])
    assert metrics["test"]["accuracy"] > 0.8


def test_two_processes_replace_an_earlier_run_with_output_overwrite(tiny_config: dict, tmp_path: Path) -> None:
    """The earlier run goes only once the new one has loaded (rundir.open_run's `ready`): every process must wait at
    the same barriers, also where only the main process found the folder full."""
    tiny_config["train"].update(batch_size=4, max_steps=2)
    tiny_config["output"].update(name="again", overwrite=True)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lmtune.cli", "train",
               str(config)]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "runs" / "again" / "note.txt").write_text("from the first run")
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    folder = tmp_path / "runs" / "again"
    assert not (folder / "note.txt").exists() and (folder / "model" / "config.json").is_file()
