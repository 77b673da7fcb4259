"""Config: typed sections, overrides, and errors that name the key and suggest the fix."""

from __future__ import annotations

import pytest

from lmtune.config import ConfigError, apply_overrides, load_config

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
