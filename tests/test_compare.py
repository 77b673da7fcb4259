"""`lmtune compare`: several methods and seeds on one config -> table, CSV, chart, runs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from lmtune.cli import app


def test_compare_methods_and_seeds(tiny_config, tmp_path) -> None:
    tiny_config["train"]["epochs"] = 1
    tiny_config["method"] = {"name": "full", "head_lr": 1e-2}  # kept for full, dropped for the others
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(config), "--methods", "head,full,bitfit", "--seeds", "2",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["head", "full", "bitfit"]
    assert all(r["seeds"] == "2" for r in rows)
    params = {r["method"]: int(r["trainable_params"]) for r in rows}
    assert params["head"] < params["bitfit"] < params["full"]
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 6 and len({r["run"] for r in runs}) == 6
    full_cfg = yaml.safe_load((out / "full-seed1" / "config.yaml").read_text())
    assert full_cfg["method"]["head_lr"] == 1e-2 and full_cfg["train"]["seed"] == 1
    table = (out / "compare.md").read_text()
    assert "| head |" in table and "± " in table and "(2 seeds)" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_specs_with_options() -> None:
    import pytest

    from lmtune.studies.compare import parse_methods

    assert parse_methods("full, lora(lr=5e-4 r=16),bitfit(lr=1e-3)") == [
        ("full", {}), ("lora", {"lr": 5e-4, "r": 16}), ("bitfit", {"lr": 1e-3})]
    with pytest.raises(ValueError, match="not key=value"):
        parse_methods("lora(r16)")
    assert parse_methods("lora(r=4, lr=1e-3)") == [("lora", {"r": 4, "lr": 1e-3})]
    assert parse_methods("lora(target_modules=[query, value] r=8),full") == [
        ("lora", {"target_modules": ["query", "value"], "r": 8}), ("full", {})]
    with pytest.raises(ValueError, match="cannot read the value of 'target_modules=\\[query'"):
        parse_methods("lora(target_modules=[query r=8)")
    for spec, part in (("full head", "full head"), ("full;lora", "full;lora"), ("lora(r=4", "lora(r=4"),
                       ("full,", "")):  # each was read as fewer methods, or a method named '4'
        with pytest.raises(ValueError, match=re.escape(f"cannot read '{part}'")):
            parse_methods(spec)
    with pytest.raises(ValueError, match=r"lora\(r=4\) is given twice"):  # the same runs into the same folders
        parse_methods("full,lora(r=4),lora(r=4)")
    from lmtune.studies.seeds import parse_seeds

    with pytest.raises(ValueError, match="distinct seeds"):
        parse_seeds("1,1")


def test_every_method_is_checked_before_the_first_run(tiny_config, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(config), "-m", "head,lorra,lora(r=4 lrr=1e-3)", "-o", str(out)])
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert "unknown method 'lorra'" in message and "method.lrr" in message
    assert not out.exists()  # nothing trained, nothing written


def test_compare_folder_is_output_name_and_not_reused_silently(tiny_config, tmp_path) -> None:
    tiny_config["train"]["epochs"] = 1
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    folder = Path(tiny_config["output"]["dir"]) / "side-by-side"
    result = CliRunner().invoke(app, ["compare", str(config), "-m", "head", "output.name=side-by-side"])
    assert result.exit_code == 0, result.output
    assert (folder / "compare.csv").is_file() and len(list(folder.glob("head-seed*/metrics.json"))) == 1
    result = CliRunner().invoke(app, ["compare", str(config), "-m", "head", "output.name=side-by-side"])
    assert result.exit_code != 0 and "output.overwrite" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["compare", str(config), "-m", "head", "output.name=side-by-side",
                                      "output.overwrite=true"])
    assert result.exit_code == 0, result.output


def test_setup_problems_stop_compare_before_any_run(tiny_config, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(config), "-m", "head,full", "-o", str(out),
                                      f"eval.general_text={tmp_path / 'missing.txt'}"])
    assert result.exit_code != 0 and "eval.general_text" in " ".join(result.output.split())
    assert not out.exists()


def test_chart_has_a_memory_panel_only_where_memory_was_measured(tmp_path) -> None:
    import struct

    from lmtune.studies.compare import plot_comparison

    rows = [{"method": name, "seeds": 1, "split": "test", "metric_mean": acc, "metric_std": 0.0,
             "trainable_params": params, "total_params": 1000, "train_seconds_mean": 3.0, "peak_memory_mb": memory}
            for name, acc, params, memory in (("full", 0.9, 1000, 900.0), ("lora(lr=0.0005 r=16 alpha=32)", 0.88,
                                                                            30, 500.0))]

    def width(path: Path) -> int:  # the PNG header's IHDR width
        return struct.unpack(">I", path.read_bytes()[16:20])[0]

    with_memory = plot_comparison(rows, tmp_path / "gpu.png", "accuracy")
    cpu = plot_comparison([{**r, "peak_memory_mb": None} for r in rows], tmp_path / "cpu.png", "accuracy")
    assert width(with_memory) - width(cpu) >= 3 * 120  # one more panel of 3.2 inches at 120 dpi


def test_a_dotted_key_sets_a_config_value_for_that_methods_runs(tiny_config, tmp_path) -> None:
    """Mitigations that are not methods (replay, label smoothing, L2-SP's data) sit in the same table."""
    from lmtune.studies.compare import parse_methods

    tiny_config["train"]["epochs"] = 1
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "cmp"
    spec = "full,full(train.label_smoothing=0.2 head_lr=1e-2)"
    assert parse_methods(spec)[1] == ("full", {"train.label_smoothing": 0.2, "head_lr": 1e-2})
    result = CliRunner().invoke(app, ["compare", str(config), "--methods", spec, "-o", str(out)])
    assert result.exit_code == 0, result.output
    runs = {r["method"]: r["run"] for r in json.loads((out / "runs.json").read_text())}
    plain = yaml.safe_load((Path(runs["full"]) / "config.yaml").read_text())
    smoothed = yaml.safe_load((Path(runs["full(train.label_smoothing=0.2 head_lr=0.01)"]) / "config.yaml").read_text())
    assert plain["train"]["label_smoothing"] == 0.0 and smoothed["train"]["label_smoothing"] == 0.2
    assert smoothed["method"]["head_lr"] == 1e-2 and "train.label_smoothing" not in smoothed["method"]
    bad = CliRunner().invoke(app, ["compare", str(config), "--methods", "full(train.label_smothing=0.2)",
                                   "-o", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "label_smothing" in bad.output


def test_one_column_one_metric_when_a_method_selects_by_another(tiny_config, tmp_path) -> None:
    """`full(eval.metric=loss)` selects its checkpoint by loss; the table's column stays the task's metric."""
    tiny_config["train"]["epochs"] = 1
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(config), "--methods", "full,full(eval.metric=loss)", "-o",
                                      str(out)])
    assert result.exit_code == 0, result.output
    for row in json.loads((out / "runs.json").read_text()):
        metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
        assert row["metric"] == metrics["test"]["accuracy"], row
    assert "accuracy" in (out / "compare.md").read_text()
