"""Output folders are lmtune's own: names are one path component, overwrite empties only marked folders, a run
holds its folder's lock for its life, and two runs on one name never share it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import lmtune
import lmtune.run as run_module
from lmtune.cli import app
from lmtune.config import ConfigError, load_config
from lmtune.errors import FolderError
from lmtune.folders import MARKER, FolderLock, claim


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", [".", "..", "../x", "/tmp/x", "a/b", "a\\b", ""])
def test_a_run_name_is_one_plain_path_component(name: str, tiny_config: dict, tmp_path: Path) -> None:
    # output.dir holds another run and a folder of the user's beside it: nothing of either may go.
    root = Path(tiny_config["output"]["dir"])
    (root / "other-run").mkdir(parents=True)
    (root / "other-run" / "metrics.json").write_text("{}")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    before = _tree(tmp_path)
    tiny_config["output"].update(name=name, overwrite=True)
    with pytest.raises(ConfigError, match="output.name"):
        lmtune.train(tiny_config)
    assert _tree(tmp_path) == before


def test_overwrite_replaces_only_a_folder_lmtune_marked(tiny_config: dict) -> None:
    tiny_config["train"]["max_steps"] = 1
    folder = Path(tiny_config["output"]["dir"]) / "tiny"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    tiny_config["output"]["overwrite"] = True
    with pytest.raises(FolderError, match="did not make it"):
        lmtune.train(tiny_config)
    assert _tree(folder) == ["thesis.tex"]
    (folder / "thesis.tex").unlink()  # an empty folder is taken: nothing in it to lose
    first = lmtune.train(tiny_config)
    assert (first.run_dir / MARKER).is_file() and json.loads((first.run_dir / MARKER).read_text())["kind"] == "run"
    (first.run_dir / "note.txt").write_text("written into the run")
    again = lmtune.train(tiny_config)  # marked: replaced
    assert again.run_dir == first.run_dir and not (again.run_dir / "note.txt").exists()
    assert (again.run_dir / "model" / "config.json").is_file()


def test_overwrite_keeps_the_earlier_run_until_the_new_data_and_model_have_loaded(tiny_config: dict,
                                                                                 tmp_path: Path) -> None:
    """A bad row in the new data (an error `lmtune validate` reports before any training) must not cost the
    finished run that output.overwrite would replace: it goes only once the new run's data and model have loaded."""
    tiny_config["train"]["max_steps"] = 1
    first = lmtune.train(tiny_config)
    before = {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file() and p.name != MARKER}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "pos"}\n{"text": "no label here"}\n', encoding="utf-8")
    tiny_config["output"]["overwrite"] = True
    with pytest.raises(Exception, match="row 2"):
        lmtune.train({**tiny_config, "data": {**tiny_config["data"], "train": str(bad)}})
    assert {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file() and p.name != MARKER} == before
    tiny_config["train"]["lr"] = 1e-3  # a good config still replaces it, config included
    again = lmtune.train(tiny_config)
    assert load_config(again.run_dir / "config.yaml").train.lr == 1e-3
    assert (again.run_dir / "model" / "config.json").is_file()


def test_the_working_directory_and_folders_above_it_are_never_output_folders(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "project"
    work.mkdir()
    (work / "data.csv").write_text("text,label\n")
    monkeypatch.chdir(work)
    for folder in (Path("."), Path(".."), work, tmp_path):
        with pytest.raises(FolderError, match="working directory"):
            claim(folder, "run", overwrite=True)
    assert _tree(tmp_path) == ["project", "project/data.csv"]


def test_output_dir_that_is_a_file_is_a_one_line_error(tiny_config: dict, tmp_path: Path) -> None:
    (tmp_path / "runs-file").write_text("not a folder")
    tiny_config["output"]["dir"] = str(tmp_path / "runs-file")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 1
    assert "is a file, not a folder" in " ".join(result.output.split()) and "Traceback" not in result.output


def test_a_folder_held_by_a_live_run_is_refused_and_free_once_released(tiny_config: dict) -> None:
    tiny_config["train"]["max_steps"] = 1
    folder = Path(tiny_config["output"]["dir"]) / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("started by another process\n")
    lock = FolderLock(folder)  # what a run in another process holds while it lives
    lock.note("run")
    try:
        with pytest.raises(FolderError, match=rf"in use by another lmtune process \(pid {os.getpid()}"):
            lmtune.train(tiny_config)
        assert (folder / "config.yaml").read_text() == "started by another process\n"  # not "stopped": it is held
    finally:
        lock.release()
    # Free now, it holds only a config: a run that stopped before training, replaced without overwrite.
    result = lmtune.train(tiny_config)
    assert load_config(result.run_dir / "config.yaml").train.max_steps == 1


def test_the_lock_is_released_when_a_run_fails(tiny_config: dict, tmp_path: Path) -> None:
    tiny_config["data"]["train"] = str(tmp_path / "missing.csv")
    with pytest.raises(lmtune.data.DataError):
        lmtune.train(tiny_config)
    FolderLock(Path(tiny_config["output"]["dir"]) / "tiny").release()  # would raise if still held


@pytest.mark.slow
def test_two_runs_started_together_on_one_name_one_trains_the_other_is_refused(tiny_config: dict,
                                                                                 tmp_path: Path) -> None:
    tiny_config["train"].update(epochs=2, eval_every=3)
    configs = []
    for seed in (1, 2):
        tiny_config["train"]["seed"] = seed
        configs.append(tmp_path / f"seed{seed}.yaml")
        configs[-1].write_text(yaml.safe_dump(tiny_config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    cli = [sys.executable, "-m", "lmtune.cli", "train"]
    procs = [subprocess.Popen([*cli, str(c)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in configs]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outputs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    said = " ".join(outputs[loser].split())
    assert "in use by another lmtune process" in said or "exists; choose another output.name" in said, said
    assert "Traceback" not in outputs[loser]
    run = Path(tiny_config["output"]["dir"]) / "tiny"
    assert load_config(run / "config.yaml").train.seed == winner + 1  # the survivor's own config ...
    metrics = json.loads((run / "metrics.json").read_text())
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "eval/loss" in line]
    assert steps == sorted(set(steps)) and metrics["steps"] == steps[-1]  # ... its own evaluations, once each
    assert lmtune.load(run).predict(["great excellent"])[0]["label"] in ("positive", "negative")


def test_several_seeds_compare_and_export_keep_to_marked_folders(tiny_config: dict, tmp_path: Path) -> None:
    from lmtune.studies.compare import compare
    from lmtune.predict import export

    tiny_config["train"]["max_steps"] = 1
    root = Path(tiny_config["output"]["dir"])
    users = root / "mine"
    users.mkdir(parents=True)
    (users / "keep.txt").write_text("mine")
    for seeds in (None, [1, 2]):
        tiny_config["train"]["seeds"] = seeds
        tiny_config["output"].update(name="mine", overwrite=True)
        with pytest.raises(FolderError, match="did not make it"):
            lmtune.train(tiny_config)
    tiny_config["train"]["seeds"] = None
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    with pytest.raises(FolderError, match="did not make it"):
        compare(config, [("head", {})], output=users)
    assert _tree(users) == ["keep.txt"]

    tiny_config["output"].update(name="tiny", overwrite=False)
    run = lmtune.train(tiny_config).run_dir
    with pytest.raises(FolderError, match="not written by `lmtune export`"):
        export(run, users, overwrite=True)
    assert _tree(users) == ["keep.txt"]
    with pytest.raises(FolderError, match="working directory"):
        export(run, Path.cwd(), overwrite=True)
    out = tmp_path / "exported"
    export(run, out)
    (out / "stale.txt").write_text("from before")
    export(run, out, overwrite=True)  # an earlier export: replaced
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert not list(tmp_path.glob(".exported*")) and not list(tmp_path.glob("exported.*"))  # no leftovers


def test_a_run_interrupted_by_ctrl_c_says_how_to_resume(tiny_config: dict, tmp_path: Path, monkeypatch) -> None:
    from lmtune.rundir import RunInterrupted

    tiny_config["train"].update(eval_every=3)

    def ctrl_c(state) -> None:
        if state.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted, match=r"last checkpoint \(step 3\) is kept: .* with --resume continues it"):
        lmtune.train(tiny_config, callbacks=[ctrl_c])
    config = tmp_path / "run.yaml"
    tiny_config["output"]["name"] = "cli"
    config.write_text(yaml.safe_dump(tiny_config))
    real = run_module.train
    monkeypatch.setattr(run_module, "train", lambda *a, **k: real(*a, **k, callbacks=[ctrl_c]))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 130
    text = " ".join(result.output.split())
    assert "interrupted; run directory" in text and "--resume continues it" in text and "Traceback" not in text
    monkeypatch.setattr(run_module, "train", real)
    assert lmtune.train(tiny_config, resume=True).metrics["steps"] > 4


def test_a_marker_that_is_a_link_or_a_folder_marks_nothing(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's data")
    linked = tmp_path / "out" / "linked"
    linked.mkdir(parents=True)
    (linked / MARKER).symlink_to(precious)  # a run folder handed over with a link for a marker
    (linked / "config.yaml").write_text("x: 1\n")
    nested = tmp_path / "out" / "nested"
    (nested / MARKER).mkdir(parents=True)
    for folder in (linked, nested):
        with pytest.raises(FolderError):
            claim(folder, "run", overwrite=True)
    assert precious.read_text() == "the user's data" and (linked / "config.yaml").is_file()


def test_eval_of_a_run_whose_outputs_are_nan_is_refused_and_writes_no_nan(tiny_config: dict, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from lmtune.errors import DivergedError

    tiny_config["train"]["max_steps"] = 1
    run = lmtune.train(tiny_config).run_dir
    weights = run / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(v, float("nan")) if "classifier" in k else v for k, v in tensors.items()},
              str(weights), metadata={"format": "pt"})
    test_file = load_config(run / "config.yaml").data.test
    with pytest.raises(DivergedError, match="not finite"):
        lmtune.evaluate(run, test_file)
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["eval", str(run), "--data", test_file, "-o", str(out)])
    assert result.exit_code == 1 and "not finite" in result.output and not out.exists()
    preds = lmtune.load(run).predict(["great film"])
    assert "error" in preds[0] and "score" not in preds[0]
    shutil.rmtree(run)


def test_resume_finds_only_this_configs_runs_and_same_second_runs_get_their_own_folders(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    from lmtune import rundir

    root = tmp_path / "runs"
    for name in ("tiny-20261208-010101", "tiny-big-20261208-020202", "tiny-20261207-230000", "tinyx-20261209-000000"):
        (root / name).mkdir(parents=True)
    assert rundir.find_run(root, "tiny", lambda p: True).name == "tiny-20261208-010101"  # not tiny-big's, later
    monkeypatch.setattr(rundir, "new_name", lambda stem: f"{stem}-20261208-010101")  # two starts in one second
    second = rundir.new_folder(root, "tiny")
    assert second.name == "tiny-20261208-010101-2" and second.is_dir()
    assert rundir.find_run(root, "tiny", lambda p: True) == second
    assert rundir.find_run(root, "tiny", lambda p: p != second).name == "tiny-20261208-010101"
    with pytest.raises(FileNotFoundError, match="no unfinished run"):
        rundir.find_run(root, "tiny", lambda p: False)
