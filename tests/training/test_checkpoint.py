"""Checkpoints: a save cut off between its two renames resumes exactly; a damaged part stops the resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmtune
from lmtune.training import checkpoint
from lmtune.training.checkpoint import CheckpointError, recover_dir


class Interrupt(Exception):
    pass


def _crash_at(step: int):
    def crash(state) -> None:
        if state.step == step:
            raise Interrupt
    return crash


def test_a_save_cut_off_between_its_renames_resumes_exactly(tiny_config: dict, monkeypatch) -> None:
    tiny_config["train"].update(eval_every=3, epochs=2)
    tiny_config["output"]["name"] = "straight"
    straight = lmtune.train(tiny_config)

    tiny_config["output"]["name"] = "cut"
    real, saves = os.replace, []

    def replace(src, dst) -> None:  # the process dies between `last` -> aside and `last.tmp` -> `last`
        if Path(src).name == "last.tmp":
            saves.append(src)
            if len(saves) == 2:
                raise Interrupt
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(Interrupt):
        lmtune.train(tiny_config)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    folder = Path(tiny_config["output"]["dir"]) / "cut" / "checkpoints"
    assert not (folder / "last").exists() and (folder / "last.tmp").is_dir() and list(folder.glob("last.old-*"))

    resumed = lmtune.train(tiny_config, resume=True)  # from the complete step-6 save in last.tmp
    assert resumed.metrics["steps"] == straight.metrics["steps"]
    a = load_file(str(straight.run_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_recovery_takes_the_old_checkpoint_when_the_new_one_is_incomplete(tmp_path: Path) -> None:
    old, tmp = tmp_path / "last.old-1234abcd", tmp_path / "last.tmp"
    old.mkdir()
    (old / "loop_state.json").write_text("{}")
    tmp.mkdir()
    (tmp / "state").mkdir()  # cut off before its loop state was written
    recover_dir(tmp_path / "last")
    assert (tmp_path / "last" / "loop_state.json").is_file() and not old.exists()


def test_a_cut_random_state_file_stops_the_resume(tiny_config: dict, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from lmtune.cli import app

    tiny_config["train"].update(eval_every=3)
    with pytest.raises(Interrupt):
        lmtune.train(tiny_config, callbacks=[_crash_at(4)])
    rng = Path(tiny_config["output"]["dir"]) / "tiny" / "checkpoints" / "last" / "state" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="random_states_0.pkl cannot be read .* would not repeat"):
        lmtune.train(tiny_config, resume=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["train", str(config), "--resume"])
    assert result.exit_code == 1 and "random_states_0.pkl cannot be read" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_an_adapter_checkpoint_holds_what_trains_and_resumes_exactly(tiny_config: dict, monkeypatch) -> None:
    tiny_config["method"] = {"name": "lora", "r": 4, "lr": 1e-2}
    tiny_config["train"].update(eval_every=3, epochs=2)
    tiny_config["output"]["name"] = "straight"
    straight = lmtune.train(tiny_config)

    tiny_config["output"]["name"] = "cut"
    real, saves = os.replace, []

    def replace(src, dst) -> None:  # dies after the second checkpoint is complete
        real(src, dst)
        if Path(src).name == "last.tmp":
            saves.append(src)
            if len(saves) == 2:
                raise Interrupt

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(Interrupt):
        lmtune.train(tiny_config)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    state = load_file(str(Path(tiny_config["output"]["dir"]) / "cut" / "checkpoints" / "last" / "state" /
                           "model.safetensors"))
    assert state and all("lora_" in k or "classifier" in k or "pooler" in k for k in state), sorted(state)[:5]
    assert not any("word_embeddings" in k or "attention.self.query.base_layer" in k for k in state)

    resumed = lmtune.train(tiny_config, resume=True)
    assert resumed.metrics["steps"] == straight.metrics["steps"]
    a = load_file(str(straight.run_dir / "model" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_ctrl_c_between_the_renames_of_a_save_says_the_checkpoint_is_kept(tiny_config: dict, monkeypatch) -> None:
    from lmtune.rundir import RunInterrupted

    tiny_config["train"].update(eval_every=3, epochs=2)
    real, saves = os.replace, []

    def replace(src, dst) -> None:
        if Path(src).name == "last.tmp":
            saves.append(src)
            if len(saves) == 2:
                raise KeyboardInterrupt  # Ctrl-C with the step-3 save aside and the step-6 one not yet in place
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(RunInterrupted, match=r"last checkpoint \(step 6\) is kept"):
        lmtune.train(tiny_config)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert (Path(tiny_config["output"]["dir"]) / "tiny" / "checkpoints" / "last" / "loop_state.json").is_file()
