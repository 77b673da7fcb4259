"""Methods: what trains really trains, what is frozen really stays, stages and rates as configured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmtune
from lmtune.config import ConfigError, TrainConfig
from lmtune.methods import METHODS, TaskInfo
from lmtune.methods.common import parts
from lmtune.training.loop import build_optimizer


def tiny_classifier(tiny_model_dir: Path):
    from transformers import AutoModelForSequenceClassification

    from lmtune.models import head_names

    model, info = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2,
                                                                     output_loading_info=True)
    return model, TaskInfo(head_names=head_names(model, info["missing_keys"]), epochs=3)


def changed(run_dir: Path, tiny_model_dir: Path) -> set[str]:
    """Names (without the `bert.` prefix) of backbone weights that differ from the pretrained ones."""
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(run_dir / "model" / "model.safetensors"))
    return {k for k, v in before.items() if not torch.equal(v, after["bert." + k])}


def run(tiny_config: dict, method: dict, name: str, **train) -> lmtune.RunResult:
    tiny_config["method"] = method
    tiny_config["train"].update(epochs=2, **train)
    tiny_config["output"]["name"] = name
    return lmtune.train(tiny_config)


def test_parts_follow_the_structure(tiny_model_dir: Path) -> None:
    model, info = tiny_classifier(tiny_model_dir)
    p = parts(model, info)
    assert p.head == ["classifier.weight", "classifier.bias"]
    assert len(p.layers) == 2 and all(n.startswith("bert.encoder.layer.1.") for n in p.layers[1])
    assert p.embeddings[0] == "bert.embeddings.word_embeddings.weight" and len(p.embeddings) == 5
    assert set(p.rest) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert len(p.backbone) + len(p.head) == len(list(model.parameters()))


@pytest.mark.parametrize("train, expect_changed, expect_frozen", [
    ({"train": "top_layers", "layers": 1}, "encoder.layer.1.", ("embeddings.", "encoder.layer.0.")),
    ({"train": "bias"}, "bias", ("weight",)),
    ({"train": "no_embeddings"}, "encoder.layer.0.", ("embeddings.",)),
])
def test_partial_trains_only_its_part(tiny_config, tiny_model_dir, train, expect_changed, expect_frozen) -> None:
    result = run(tiny_config, {"name": "partial", **train}, f"partial-{train['train']}")
    diff = changed(result.run_dir, tiny_model_dir)
    assert any(expect_changed in k for k in diff)
    assert not any(frozen in k for k in diff for frozen in expect_frozen), sorted(diff)
    assert result.metrics["params"]["trainable"] < result.metrics["params"]["total"]


def test_bitfit_is_partial_bias(tiny_config, tiny_model_dir) -> None:
    result = run(tiny_config, {"name": "bitfit"}, "bitfit")
    diff = changed(result.run_dir, tiny_model_dir)
    assert diff and all(k.endswith("bias") for k in diff)
    from lmtune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="method.layers: unknown key"):  # partial's option means nothing here
        load_config({**tiny_config, "method": {"name": "bitfit", "layers": 5}})
    saved = {"name": "bitfit", "train": "bias", "layers": 2, "lr": None, "head_lr": None}  # as runs before saved it
    assert load_config({**tiny_config, "method": saved}).method.name == "bitfit"


def test_bitfit_refuses_a_model_without_biases_even_with_a_head(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from helpers import make_tiny_decoder

    model = AutoModelForCausalLM.from_pretrained(make_tiny_decoder(tmp_path / "llama", tied=False))
    info = TaskInfo(head_names=["lm_head.weight"])  # an untied output layer counts as the head
    with pytest.raises(ValueError, match="method bitfit \\(partial with train=bias\\): this LlamaForCausalLM has no "
                       "such parameters to train \\(it has no biases\\)"):
        METHODS["bitfit"].apply(model, info, METHODS["bitfit"].Options())


def test_lp_ft_probes_then_fine_tunes(tiny_config, tiny_model_dir) -> None:
    # Selected by loss: accuracy saturates at 1.0 in the probe already, and a fine-tune that only ties
    # it would (rightly) not replace the probe's weights as the best.
    result = lmtune.train({**tiny_config, "eval": {"metric": "loss"},
                           "method": {"name": "lp_ft", "probe_epochs": 2, "probe_lr": 1e-2, "epochs": 2}})
    stages = result.metrics["stages"]
    assert list(stages) == ["probe", "fine-tune"]
    assert stages["probe"]["feature_cache"] is True and stages["fine-tune"]["feature_cache"] is False
    assert stages["probe"]["trainable_params"] < stages["fine-tune"]["trainable_params"]
    assert result.metrics["steps"] == 2 * 9 + 2 * 9
    assert any("encoder" in k for k in changed(result.run_dir, tiny_model_dir))
    records = [r for r in map(__import__("json").loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())]
    assert {r["stage"] for r in records if "eval/accuracy" in r} == {"probe", "fine-tune"}


def test_lp_ft_probe_may_train_the_pooler(tiny_model_dir) -> None:
    model, info = tiny_classifier(tiny_model_dir)
    pooler = {n for n, _ in model.named_parameters() if n.startswith("bert.pooler.")}
    assert pooler
    for probe_pooler in (False, True):
        probe, _ = METHODS["lp_ft"].apply(model, info, METHODS["lp_ft"].Options(probe_pooler=probe_pooler))
        assert (pooler <= set(probe.trainable)) == probe_pooler
        assert not any(".encoder." in n or ".embeddings." in n for n in probe.trainable)


def test_lp_ft_probe_with_the_pooler_still_trains_on_cached_features(tiny_config, tiny_model_dir) -> None:
    result = lmtune.train({**tiny_config, "method": {"name": "lp_ft", "probe_epochs": 1, "epochs": 1,
                                                     "probe_pooler": True}})
    assert result.metrics["stages"]["probe"]["feature_cache"] is True
    with pytest.raises(ConfigError, match="probe_pooler=true, but this model uses no pooler"):  # before training
        lmtune.train({**tiny_config, "task": {"name": "classification", "pooling": "mean"},
                      "method": {"name": "lp_ft", "probe_pooler": True}})


def test_layerwise_decay_sets_rates_by_depth(tiny_model_dir) -> None:
    model, info = tiny_classifier(tiny_model_dir)
    options = METHODS["full"].Options(layer_decay=0.5, head_lr=1e-3)
    [stage] = METHODS["full"].apply(model, info, options)
    optimizer = build_optimizer(model, stage, TrainConfig(lr=1e-4), fused=False)
    by_param = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    lr = {n: by_param[id(p)] for n, p in model.named_parameters()}
    assert lr["bert.embeddings.word_embeddings.weight"] == pytest.approx(1e-4 * 0.5 ** 3)
    assert lr["bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(1e-4 * 0.5 ** 2)
    assert lr["bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(1e-4 * 0.5)
    assert lr["bert.pooler.dense.weight"] == pytest.approx(1e-4)
    assert lr["classifier.weight"] == pytest.approx(1e-3)


@pytest.mark.parametrize("decay", [0.5, 0.0])  # 0: the embeddings' rate is 0, not a division by it
def test_the_logged_rate_is_the_configured_one_under_layer_decay(tiny_config, decay) -> None:
    result = run(tiny_config, {"name": "full", "layer_decay": decay, "head_lr": 1e-2}, "llrd", lr=5e-3,
                 schedule="constant", warmup_ratio=0.0, max_steps=3, log_every=1)
    records = [__import__("json").loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx([5e-3] * 3)  # not the embeddings' decayed rate


def test_gradual_unfreezing_opens_one_block_per_epoch(tiny_model_dir) -> None:
    model, info = tiny_classifier(tiny_model_dir)
    stages = METHODS["full"].apply(model, info, METHODS["full"].Options(gradual_unfreeze=True))
    assert [s.name for s in stages] == ["full-unfreeze1", "full-unfreeze2", "full-unfreeze3"]
    first, second, third = (s.trainable for s in stages)
    assert any("layer.1." in n for n in first) and not any("layer.0." in n or "embeddings" in n for n in first)
    assert any("layer.0." in n for n in second) and not any("embeddings" in n for n in second)
    assert third == {n for n, _ in model.named_parameters()}


def test_l2sp_is_logged_and_holds_weights_near_pretrained(tiny_config, tiny_model_dir) -> None:
    def drift(run_dir: Path) -> float:
        before = load_file(str(tiny_model_dir / "model.safetensors"))
        after = load_file(str(run_dir / "model" / "model.safetensors"))
        return sum(float(((after["bert." + k] - v) ** 2).sum()) for k, v in before.items())

    free = run(tiny_config, {"name": "full"}, "free")
    held = run(tiny_config, {"name": "full", "l2sp": 10.0}, "held")
    assert drift(held.run_dir) < 0.5 * drift(free.run_dir)
    records = [__import__("json").loads(line) for line in (held.run_dir / "metrics.jsonl").read_text().splitlines()]
    penalties = [r["train/penalty"] for r in records if "train/penalty" in r]
    assert penalties and all(p >= 0 for p in penalties) and max(penalties) > 0
