"""Hub model ids, offline: a cache prepared in the standard huggingface_hub layout serves them; the commit is recorded;
pickles and code are refused unless allowed; a missing id says what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import lmtune
from lmtune.config import load_config
from lmtune.errors import ModelError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, source: Path, commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """A model as `snapshot_download` leaves it in the cache: snapshots/<commit>/<files>, refs/<revision> -> commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (folder / "refs").mkdir()
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no machine here reaches a hub
    return cache


def test_a_hub_id_from_the_cache_trains_records_its_commit_and_reloads(hub_cache, tiny_model_dir, tiny_config,
                                                                       tmp_path) -> None:
    cache_repo(hub_cache, "lmtune-test/tiny-bert", tiny_model_dir, refs=("main", "v1"))
    tiny_config["train"]["max_steps"] = 2
    for name, run in (("lmtune-test/tiny-bert", "latest"), ("lmtune-test/tiny-bert@v1", "tagged")):
        tiny_config["model"]["name"] = name
        tiny_config["output"]["name"] = run
        result = lmtune.train(tiny_config)
        pinned = f"lmtune-test/tiny-bert@{COMMIT}"
        assert load_config(result.run_dir / "config.yaml").model.name == pinned  # repeats the run exactly
        assert json.loads((result.run_dir / "metrics.json").read_text())["model"] == pinned
        assert lmtune.load(result.run_dir).predict(["great film"])[0]["label"] in ("negative", "positive")


def test_a_lora_run_reloads_its_hub_base_from_the_cache_and_says_when_it_is_gone(hub_cache, tiny_model_dir,
                                                                                  tiny_config) -> None:
    cache_repo(hub_cache, "lmtune-test/tiny-bert", tiny_model_dir)
    tiny_config["model"]["name"] = "lmtune-test/tiny-bert"
    tiny_config["method"] = {"name": "lora", "r": 2}
    tiny_config["train"]["max_steps"] = 2
    run = lmtune.train(tiny_config).run_dir
    assert lmtune.load(run).predict(["great film"])[0]["label"] in ("negative", "positive")
    shutil.rmtree(hub_cache / "models--lmtune-test--tiny-bert")
    with pytest.raises(ModelError, match=r"not in the Hugging Face cache .* HF_HUB_OFFLINE=1 is set"):
        lmtune.load(run)


def test_pickled_weights_and_model_code_from_the_hub_are_refused_with_the_option_named(hub_cache, tiny_model_dir,
                                                                                        tiny_config) -> None:
    import torch
    from safetensors.torch import load_file

    snapshot = cache_repo(hub_cache, "lmtune-test/pickled", tiny_model_dir)
    torch.save(load_file(str(snapshot / "model.safetensors")), snapshot / "pytorch_model.bin")
    (snapshot / "model.safetensors").unlink()
    tiny_config["model"]["name"] = "lmtune-test/pickled"
    tiny_config["train"]["max_steps"] = 1
    with pytest.raises(ModelError, match="model.allow_pickle=true"):
        lmtune.train(tiny_config)
    tiny_config["model"]["allow_pickle"] = True
    assert lmtune.train(tiny_config).metrics["steps"] == 1

    snapshot = cache_repo(hub_cache, "lmtune-test/custom", tiny_model_dir, commit="f" * 40)
    config = json.loads((snapshot / "config.json").read_text())
    config.update(model_type="custombert", auto_map={"AutoConfig": "custom.CustomConfig"})
    (snapshot / "config.json").write_text(json.dumps(config))
    (snapshot / "custom.py").write_text("raise SystemExit('model code ran')\n")
    tiny_config["model"] = {"name": "lmtune-test/custom"}
    tiny_config["output"]["name"] = "custom"
    with pytest.raises(ModelError, match="model.trust_remote_code=true"):
        lmtune.train(tiny_config)


def test_a_name_found_nowhere_names_both_readings_and_the_way_out(hub_cache, tiny_config) -> None:
    tiny_config["model"]["name"] = "lmtune-test/missing"
    with pytest.raises(ModelError, match=r"no local folder of that name, and the Hub model 'lmtune-test/missing' is "
                                         r"not in the Hugging Face cache .*hf download lmtune-test/missing"):
        lmtune.train(tiny_config)
    tiny_config["model"]["name"] = "lmtune-test/missing@v9"  # the command fetches the revision asked for
    with pytest.raises(ModelError, match=r"hf download lmtune-test/missing --revision v9`"):
        lmtune.train(tiny_config)
    tiny_config["model"]["name"] = "../not/here"
    with pytest.raises(ModelError, match="neither a built-in name .*, a local folder nor a Hub id"):
        lmtune.train(tiny_config)


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(hub_cache, tiny_model_dir, tiny_config, tmp_path,
                                                           monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "lmtune-test" / "tiny-bert")  # and nothing of it in the cache
    tiny_config["model"]["name"] = "lmtune-test/tiny-bert"
    tiny_config["train"]["max_steps"] = 1
    run = lmtune.train(tiny_config).run_dir
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == "lmtune-test/tiny-bert"


def cache_dataset(cache: Path, repo: str, files: dict[str, list[dict]], commit: str = COMMIT) -> Path:
    """A dataset repository as `snapshot_download(repo_type="dataset")` leaves it: CSV files named by split."""
    from helpers import write_csv

    folder = cache / f"datasets--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, rows in files.items():
        write_csv(snapshot / name, rows)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hub_dataset_from_the_cache_trains_records_its_commit_and_names_its_bad_rows(hub_cache, tiny_config,
                                                                                      tmp_path) -> None:
    from helpers import make_sentiment_rows

    from lmtune.errors import DataError

    rows = make_sentiment_rows(64, seed=1)
    cache_dataset(hub_cache, "lmtune-test/reviews", {"train.csv": rows, "test.csv": make_sentiment_rows(16, seed=2)})
    tiny_config["data"].update(train="hf:lmtune-test/reviews:train", test="hf:lmtune-test/reviews:test")
    tiny_config["train"]["max_steps"] = 2
    result = lmtune.train(tiny_config)
    saved = load_config(result.run_dir / "config.yaml").data
    assert (saved.train, saved.test) == (f"hf:lmtune-test/reviews@{COMMIT}:train", f"hf:lmtune-test/reviews@{COMMIT}:test")
    assert result.metrics["data"]["rows"]["test"] == 16

    rows[4]["text"] = ""  # checked as a local file's rows are, and named the same way
    cache_dataset(hub_cache, "lmtune-test/broken", {"train.csv": rows}, commit="e" * 40)
    tiny_config["data"].update(train="hf:lmtune-test/broken:train", test=None)
    tiny_config["output"]["name"] = "broken"
    with pytest.raises(DataError, match=r"hf:lmtune-test/broken@e{40}:train, row 5, field 'text': empty text"):
        lmtune.train(tiny_config)
    tiny_config["data"]["train"] = "hf:lmtune-test/absent:train"
    with pytest.raises(DataError, match=r"not in the Hugging Face cache .*hf download --repo-type dataset"):
        lmtune.train(tiny_config)
    tiny_config["data"]["train"] = "hf:no-split-named"
    with pytest.raises(DataError, match=r"hf:ORG/NAME\[@REVISION\]\[/CONFIG\]:SPLIT"):
        lmtune.train(tiny_config)


def test_a_resumed_run_stays_on_the_commit_it_started_on_when_the_branch_moved(hub_cache, tiny_model_dir,
                                                                               tiny_config) -> None:
    snapshot = cache_repo(hub_cache, "lmtune-test/tiny-bert", tiny_model_dir)
    tiny_config["model"]["name"] = "lmtune-test/tiny-bert"
    tiny_config["train"].update(eval_every=3)

    class Stop(Exception):
        pass

    def crash(state) -> None:
        if state.step == 4:
            raise Stop

    with pytest.raises(Stop):
        lmtune.train(tiny_config, callbacks=[crash])
    moved = "9" * 40  # main moves on upstream while the run is interrupted
    shutil.copytree(snapshot, snapshot.parent / moved)
    (hub_cache / "models--lmtune-test--tiny-bert" / "refs" / "main").write_text(moved)
    result = lmtune.train(tiny_config, resume=True)  # the same config, given again
    assert load_config(result.run_dir / "config.yaml").model.name == f"lmtune-test/tiny-bert@{COMMIT}"
    assert result.metrics["model"] == f"lmtune-test/tiny-bert@{COMMIT}"


def test_the_runs_of_a_study_share_the_commit_pinned_when_it_started(hub_cache, tiny_model_dir, tiny_config) -> None:
    snapshot = cache_repo(hub_cache, "lmtune-test/tiny-bert", tiny_model_dir)
    moved = "9" * 40
    shutil.copytree(snapshot, snapshot.parent / moved)
    tiny_config["model"]["name"] = "lmtune-test/tiny-bert"
    tiny_config["train"].update(seeds=[1, 2], max_steps=2)

    def push(state) -> None:  # main moves on upstream while the first seed trains
        (hub_cache / "models--lmtune-test--tiny-bert" / "refs" / "main").write_text(moved)

    result = lmtune.train(tiny_config, callbacks=[push])
    for seed in (1, 2):
        assert load_config(result.run_dir / f"seed-{seed}" / "config.yaml").model.name == \
            f"lmtune-test/tiny-bert@{COMMIT}"
    assert load_config(result.run_dir / "config.yaml").model.name == f"lmtune-test/tiny-bert@{COMMIT}"


def test_a_hub_ner_dataset_with_class_number_tags_trains_on_their_names(hub_cache, tiny_model_dir, tmp_path) -> None:
    import datasets

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = datasets.Features({"id": datasets.Value("string"),
                                  "tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    sentence = (["the", "doctor", "people", "was", "in", "the", "night"], [0, 1, 2, 0, 0, 0, 3])
    rows = {"id": [str(i) for i in range(24)], "tokens": [sentence[0]] * 24, "ner_tags": [sentence[1]] * 24}
    snapshot = hub_cache / "datasets--lmtune-test--conll" / "snapshots" / COMMIT
    (snapshot / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(snapshot / "data" / "train.parquet")
    (hub_cache / "datasets--lmtune-test--conll" / "refs").mkdir()
    (hub_cache / "datasets--lmtune-test--conll" / "refs" / "main").write_text(COMMIT)
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": "hf:lmtune-test/conll:train", "validation_size": 0.25},
           "task": {"name": "ner", "tags_field": "ner_tags"}, "method": {"name": "full"},
           "train": {"max_steps": 2, "batch_size": 4}, "output": {"dir": str(tmp_path / "runs"), "name": "ner"}}
    result = lmtune.train(cfg)
    assert result.metrics["data"]["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # names, not numbers
    n = result.metrics["data"]["rows"]["train"]
    assert result.metrics["data"]["entities"]["train"] == {"LOC": n, "PER": n} and n > 10  # one of each a sentence
    assert load_config(result.run_dir / "config.yaml").data.train == f"hf:lmtune-test/conll@{COMMIT}:train"


def test_a_search_continued_after_the_branch_moved_stays_on_its_first_commit(hub_cache, tiny_model_dir, tiny_config,
                                                                              tmp_path) -> None:
    import yaml

    from lmtune.studies.search import search

    snapshot = cache_repo(hub_cache, "lmtune-test/tiny-bert", tiny_model_dir)
    moved = "9" * 40
    shutil.copytree(snapshot, snapshot.parent / moved)
    tiny_config["model"]["name"] = "lmtune-test/tiny-bert"
    tiny_config["train"].update(max_steps=2)
    tiny_config["search"] = {"trials": 1, "pruner": "none",
                             "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    search(config, output=tmp_path / "srch")
    (hub_cache / "models--lmtune-test--tiny-bert" / "refs" / "main").write_text(moved)  # main moves on upstream
    search(config, trials=2, output=tmp_path / "srch")
    trials = sorted((tmp_path / "srch" / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        assert load_config(trial / "config.yaml").model.name == f"lmtune-test/tiny-bert@{COMMIT}"
