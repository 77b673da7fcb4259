"""Config: typed sections, overrides, and errors that name the key and suggest the fix."""

from __future__ import annotations

import pytest

from lmtune.config import ConfigError, load_config
from lmtune.config_read import apply_overrides

BASE = {"data": {"train": "train.csv"}}


def error_of(raw: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(raw, overrides)
    return str(info.value)


def test_defaults_and_overrides_are_typed() -> None:
    cfg = load_config(BASE, ["train.lr=3e-5", "train.epochs=2", "method.name=head", "data.labels=[a, b]"])
    assert cfg.train.lr == pytest.approx(3e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2
    assert cfg.method.name == "head" and cfg.task.name == "classification"
    assert cfg.data.labels == ["a", "b"]


def test_unknown_key_suggests_nearest() -> None:
    assert "train.lrr: unknown key; did you mean 'lr'?" in error_of(BASE, ["train.lrr=1e-4"])
    assert "did you mean 'text_column'" in error_of({"data": {"train": "x", "txt_column": "review"}})
    # names other tools use for our keys, and a section's key given without its section
    assert "method.rank: unknown key; did you mean 'r'?" in error_of({**BASE, "method": {"name": "lora", "rank": 4}})
    assert "train.learning_rate: unknown key; did you mean 'lr'?" in error_of(BASE, ["train.learning_rate=1e-4"])
    assert "lr: unknown section; did you mean 'train.lr'?" in error_of(BASE, ["lr=1e-3"])


def test_unknown_section_and_registered_names() -> None:
    assert "trian: unknown section; did you mean 'train'?" in error_of({**BASE, "trian": {}})
    assert "method.name: unknown method 'lora2'; did you mean 'lora'?" in error_of(BASE, ["method.name=lora2"])
    assert "unknown method 'xyz'; known methods: bitfit, full, head, lora, lp_ft, partial" in error_of(
        BASE, ["method.name=xyz"])
    assert "did you mean 'full'" in error_of(BASE, ["method.name=ful"])
    assert "method.head_lrr: unknown key; did you mean 'head_lr'?" in error_of(BASE, ["method.head_lrr=1"])


def test_wrong_types_are_named() -> None:
    message = error_of(BASE, ["train.epochs=many"])
    assert "train.epochs" in message and "'many'" in message
    assert "train.precision" in error_of(BASE, ["train.precision=fp8"])


def test_impossible_combinations_give_one_clear_message() -> None:
    message = error_of(BASE, ["data.validation_size=0", "train.early_stopping_patience=2"])
    assert "early_stopping_patience needs validation data" in message
    assert "train.lr=-1.0: must be positive" in error_of(BASE, ["train.lr=-1"])
    assert "data.max_train_samples=0" in error_of(BASE, ["data.max_train_samples=0"])


def test_all_problems_reported_together() -> None:
    message = error_of({**BASE, "train": {"lrr": 1, "epochs": "x"}})
    assert "train.lrr" in message and "train.epochs" in message
    # several broken values of one section, each on its own line
    message = error_of(BASE, ["train.lr=-1", "train.epochs=0", "data.test_size=1.5", "model.max_length=2"])
    for problem in ("train.lr=-1.0", "train.epochs=0", "data.test_size=1.5", "model.max_length=2"):
        assert f"\n  - {problem}" in message
    # a wrong method does not hide the other sections' problems
    message = error_of(BASE, ["method.name=lorra", "train.epochs=0", "data.nope=1"])
    assert "unknown method 'lorra'" in message and "train.epochs=0" in message and "data.nope" in message


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_round_trip_through_yaml(tmp_path) -> None:
    cfg = load_config(BASE, ["method.name=head", "method.lr=0.001", "task.multi_label=true"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg and again.method.lr == 0.001 and again.task.multi_label is True


def test_missing_config_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_switching_method_by_override_drops_the_other_methods_options() -> None:
    raw = {**BASE, "method": {"name": "full", "head_lr": 1e-3}}
    cfg = load_config(raw, ["method.name=head", "method.lr=0.01"])
    assert cfg.method.name == "head" and cfg.method.lr == 0.01
    assert load_config(raw, ["method.name=full"]).method.head_lr == 1e-3  # same method: options kept


def test_overfitting_and_seed_options_are_checked() -> None:
    cfg = load_config(BASE, ["train.label_smoothing=0.1", "model.dropout=0.2", "train.seeds=[1, 2, 3]"])
    assert (cfg.train.label_smoothing, cfg.model.dropout, cfg.train.seeds) == (0.1, 0.2, [1, 2, 3])
    assert "train.label_smoothing=1.5: must be in [0, 1)" in error_of(BASE, ["train.label_smoothing=1.5"])
    assert "model.dropout=-0.1: must be in [0, 1)" in error_of(BASE, ["model.dropout=-0.1"])
    assert "give distinct seeds" in error_of(BASE, ["train.seeds=[1, 1]"])
    assert "give distinct seeds" in error_of(BASE, ["train.seeds=[]"])
    assert load_config(BASE, ["train.ema_decay=0.999"]).train.ema_decay == 0.999
    assert "train.ema_decay=1.0: must be in (0, 1)" in error_of(BASE, ["train.ema_decay=1"])


def test_a_search_section_is_left_to_lmtune_search(tmp_path) -> None:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "search": {"space": {"train.lr": {"type": "float"}}}}))
    assert load_config(path).train.lr == 5e-5


def test_ls_fields_lists_every_field_with_its_description() -> None:
    from typer.testing import CliRunner

    from lmtune.cli import app
    from lmtune.config import ReplayConfig
    from lmtune.methods import METHODS

    result = CliRunner().invoke(app, ["ls", "--fields"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "sample from [low, high]" in result.output  # text in brackets is not taken for markup
    assert "data.replay" in result.output and ReplayConfig.model_fields["ratio"].description[:40] in result.output
    for name, method in METHODS.items():
        for field, info in method.Options.model_fields.items():
            assert info.description, f"method {name}: field {field} has no description"


# A YAML alias bomb: nine anchors of nine items, each the one before it nine times (9**9 strings written out).
BOMB_ANCHORS = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
INLINE_BOMB = "[" + ", ".join(line.split(": ", 1)[1] for line in BOMB_ANCHORS) + "]"  # the anchors in one value
# Runs the CLI commands given as JSON in a fresh process (bounded memory): a bomb that slipped through would take
# minutes and gigabytes. Imports happen before the clock starts: only the command itself is timed.
BOMB_CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from typer.testing import CliRunner
from lmtune.cli import app
import datasets, lmtune.preflight, lmtune.studies.search, optuna, rich.logging, transformers  # what the commands import
import lmtune.methods  # noqa: E402,F401  (registers the built-in methods and tasks)
import lmtune.tasks  # noqa: E402,F401
for args in json.loads(sys.argv[1]):
    started = time.perf_counter()
    result = CliRunner().invoke(app, args)
    print(json.dumps({"args": args, "seconds": time.perf_counter() - started, "code": result.exit_code,
                      "output": result.output[-3000:], "length": len(result.output)}), flush=True)
"""


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path) -> None:
    import json
    import subprocess
    import sys

    under_search = tmp_path / "under-search.yaml"  # the anchors under `search:`, the bomb in model.name
    under_search.write_text("data: {train: train.csv}\nsearch:\n" + "".join(f"  {line}\n" for line in BOMB_ANCHORS)
                            + "  space: {train.lr: {type: float, low: 1.0e-5, high: 1.0e-3}}\nmodel: {name: *i}\n")
    in_name = tmp_path / "in-name.yaml"  # the whole bomb inside model.name, and a valid search section
    in_name.write_text(f"data: {{train: train.csv}}\nmodel: {{name: {INLINE_BOMB}}}\n"
                       "search: {space: {train.lr: {type: float, low: 1.0e-5, high: 1.0e-3}}}\n")
    in_method = tmp_path / "in-method.yaml"
    in_method.write_text(f"data: {{train: train.csv}}\nmethod: {{name: {INLINE_BOMB}}}\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("data: {train: train.csv}\n"
                     "search: {space: {train.lr: {type: float, low: 1.0e-5, high: 1.0e-3}}}\n")
    in_choices = tmp_path / "in-choices.yaml"  # a valid search section whose choices are the bomb
    in_choices.write_text("data: {train: train.csv}\nanchors:\n" + "".join(f"  {line}\n" for line in BOMB_ANCHORS)
                          + "search: {space: {model.name: {type: categorical, choices: *i}}}\n")
    commands = [["validate", str(under_search)], ["search", str(under_search)], ["validate", str(in_name)],
                ["search", str(in_name)], ["search", str(in_choices)], ["validate", str(in_method)],
                *([command, str(plain), f"model.name={INLINE_BOMB}"] for command in ("validate", "search"))]
    child = subprocess.run([sys.executable, "-c", BOMB_CHILD, json.dumps(commands)], capture_output=True,
                           text=True, timeout=90, cwd=tmp_path)
    results = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(commands), child.stderr[-3000:]
    for i, r in enumerate(results):
        said = " ".join(r["output"].split())
        assert r["code"] == 1 and "error:" in said and r["seconds"] < 2, r
        assert r["length"] < 5000, r  # no value written out (9**9 of them)
        if i < 6:  # refused while reading the file (search reads it too), naming it
            assert "YAML aliases" in said and r["args"][1].rsplit("/", 1)[-1] in said.replace(" ", ""), r
        else:  # an override's value, refused naming the override
            assert "YAML aliases" in said and "override 'model.name=" in said, r


def test_values_in_error_messages_are_bounded() -> None:
    long_list = [f"item {i} " * 20 for i in range(2000)]
    message = error_of({**BASE, "model": {"name": long_list}})
    assert "model.name: Input should be a valid string (got ['item 0" in message and len(message) < 600
    message = error_of({**BASE, "method": {"name": long_list}})  # was a TypeError (a list is no key of a table)
    assert "method.name:" in message and len(message) < 600
    message = error_of({**BASE, "task": [1, 2]})
    assert "task:" in message and len(message) < 600
    message = error_of({**BASE, "train": {"k" * 20_000: 1}})  # a key is shown cut too
    assert "unknown key" in message and len(message) < 1000
    message = error_of(BASE, ["train.seeds=[" + ", ".join(["7"] * 5000) + "]"])
    assert "give distinct seeds" in message and len(message) < 600
    message = error_of(BASE, ["train.lr=[1, 2"])  # a value that is not YAML: a config error, not a traceback
    assert "train.lr=[1, 2" in message and "not valid YAML" in message


def test_a_yaml_document_refusing_itself_or_too_deep_is_a_config_error(tmp_path) -> None:
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("data: {train: train.csv}\nmodel: {name: &r [*r]}\n")
    with pytest.raises(ConfigError, match="recursive.yaml: .*YAML aliases"):
        load_config(recursive)
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: {name: " + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(ConfigError, match="deep.yaml: not valid YAML"):
        load_config(deep)
    shared = tmp_path / "shared.yaml"  # anchors that stay small are fine
    shared.write_text("data: {train: train.csv, labels: &l [a, b]}\n"
                      "search: {space: {data.labels: {type: categorical, choices: [*l, *l]}}}\n")
    assert load_config(shared).data.labels == ["a", "b"]
