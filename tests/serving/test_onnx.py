"""`lmtune export --format onnx`: tiny classification, NER and QA runs exported, onnxruntime's outputs checked against
PyTorch's, and the folder run by `lmtune predict` / `lmtune.load` without the PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lmtune

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir: Path) -> dict[str, Path]:
    from test_smoke import METHOD_OPTIONS, SMOKE_DATA, TASK_OPTIONS

    root = tmp_path_factory.mktemp("onnx")
    out = {}
    # "pooled": lmtune's own head (max pooling into an MLP) on a LoRA run, merged and baked into the graph
    for key, method in (("classification", "full"), ("ner", "lora"), ("qa", "full"), ("pooled", "lora")):
        task = "classification" if key == "pooled" else key
        pooled = {"pooling": "max", "head": "mlp"} if key == "pooled" else {}
        (root / "data" / key).mkdir(parents=True)
        data, inputs = SMOKE_DATA[task](root / "data" / key)
        cfg = {"model": {"name": str(tiny_model_dir)}, "data": data,
               "task": {"name": task, **TASK_OPTIONS.get(task, {}), **pooled},
               "method": {"name": method, **METHOD_OPTIONS.get(method, {})},
               "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3}, "output": {"dir": str(root / "runs"), "name": key}}
        out[key] = (lmtune.train(cfg).run_dir, inputs)
    return out


@pytest.mark.parametrize("task", ["classification", "ner", "qa", "pooled"])
def test_an_onnx_export_matches_pytorch_and_predicts_without_it(task: str, runs, monkeypatch) -> None:
    from lmtune.predict import export

    run, inputs = runs[task]
    folder = export(run, format="onnx")
    assert folder == run.parent / f"{run.name}-onnx"
    report = json.loads((folder / "verification.json").read_text())
    assert report["rows"] > 0 and report["fp32"]["max_abs_difference"] <= 1e-3
    assert report["fp32"]["predictions_differing"] == 0 and report["fp32"]["predictions_compared"] >= report["rows"]
    expected = lmtune.load(run).predict(inputs)
    import transformers

    def no_torch_model(*args, **kwargs):
        raise AssertionError("an ONNX folder must not load a PyTorch model")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_torch_model)
    loaded = lmtune.load(folder)
    assert type(loaded.session.model).__name__ == "OnnxModel"
    got = loaded.predict(inputs)
    if task in ("classification", "pooled"):
        assert [p["label"] for p in got] == [p["label"] for p in expected]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected], abs=1e-4)
    elif task == "ner":
        assert [p["tags"] for p in got] == [p["tags"] for p in expected]
    else:
        assert [(p["answer"], p["start"]) for p in got] == [(p["answer"], p["start"]) for p in expected]
    card = (folder / "README.md").read_text()
    assert "onnxruntime" in card and f"lmtune serve {folder}" in card


def test_int8_reports_its_metric_change_and_still_predicts(runs) -> None:
    from lmtune.predict import export

    run, inputs = runs["classification"]
    folder = export(run, run.parent / "int8", format="onnx", quantize="int8")
    report = json.loads((folder / "verification.json").read_text())["int8"]
    assert set(report["change"]) >= {"accuracy", "macro_f1"}
    assert report["change"]["accuracy"] == pytest.approx(report["metrics_int8"]["accuracy"] -
                                                         report["metrics_pytorch"]["accuracy"])
    import onnx

    graph = onnx.load(str(folder / "model.onnx")).graph
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in graph.node)  # really int8
    assert len(lmtune.load(folder).predict(inputs)) == len(inputs)


def test_what_onnx_cannot_export_is_refused_clearly(runs, tiny_decoder_dir: Path, tmp_path: Path) -> None:
    from lmtune.predict import export

    run, _ = runs["classification"]
    with pytest.raises(ValueError, match="--quantize int8 only with --format onnx"):
        export(run, tmp_path / "x", quantize="int8")
    from test_smoke import SMOKE_DATA

    data, _ = SMOKE_DATA["causal_lm"](tmp_path)
    decoder = lmtune.train({"model": {"name": str(tiny_decoder_dir)}, "data": data, "task": {"name": "causal_lm"},
                            "method": {"name": "full"}, "train": {"max_steps": 1, "batch_size": 4},
                            "output": {"dir": str(tmp_path / "runs"), "name": "lm"}}).run_dir
    with pytest.raises(ValueError, match="classification, NER and QA encoders"):
        export(decoder, format="onnx")
    assert not (decoder.parent / "lm-onnx").exists()
    with pytest.raises(ValueError, match="classification, NER and QA encoders"):
        export(decoder, tmp_path / "exports" / "deep" / "lm-onnx", format="onnx")
    assert not (tmp_path / "exports").exists()  # refused before any folder is made


@pytest.mark.parametrize("trans_b, weight_is_input", [(1, False), (0, False), (1, True)])
def test_gemm_is_rewritten_as_matmul_with_the_same_outputs(trans_b: int, weight_is_input: bool, tmp_path: Path) -> None:
    """How some torch versions export a Linear (Gemm, weight transposed) becomes MatMul + Add computing the same,
    and the rewritten graph quantizes (older onnxruntime quantizers failed on the Gemm form)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lmtune.serving.onnx import gemm_as_matmul

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 8) if trans_b else (8, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])]
    weights = [numpy_helper.from_array(bias, "bias")]
    if weight_is_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)))
    else:
        weights.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "bias"], ["y"], transB=trans_b)], "linear", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(5, 8)).astype(np.float32)
    feed = {"x": x, **({"w": w} if weight_is_input else {})}

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]

    before = run(model)
    gemm_as_matmul(model.graph)
    onnx.checker.check_model(model)
    assert "Gemm" not in {n.op_type for n in model.graph.node} and "MatMul" in {n.op_type for n in model.graph.node}
    np.testing.assert_allclose(run(model), before, atol=1e-5)
    np.testing.assert_allclose(before, x @ (w.T if trans_b else w) + bias, atol=1e-5)
    if not weight_is_input:
        onnx.save(model, str(tmp_path / "m.onnx"))
        quantize_dynamic(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
        assert "MatMulInteger" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}


def test_gemm_rewrite_shares_one_copy_and_takes_no_name_in_use() -> None:
    """Two Gemms sharing a transposed weight get one copy; names already in the graph (`w_transposed`, `y_matmul`)
    are not reused, so the rewritten graph stays valid and computes the same."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lmtune.serving.onnx import gemm_as_matmul

    rng = np.random.default_rng(1)
    w, other = rng.normal(size=(4, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1),
             helper.make_node("Gemm", ["y", "w", "c"], ["z"], transB=1),
             helper.make_node("Add", ["z", "w_transposed"], ["sum"]),
             helper.make_node("Identity", ["sum"], ["y_matmul"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y_matmul", TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(other, "w_transposed"),
                               numpy_helper.from_array(other * 2, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(3, 4)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    before = run(model)
    gemm_as_matmul(model.graph)
    onnx.checker.check_model(model, full_check=True)
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names)) == 4  # w, w_transposed (the old one), c, and one transposed copy
    np.testing.assert_allclose(run(model), before, atol=1e-5)
    np.testing.assert_allclose(before, (x @ w.T) @ w.T + other * 2 + other, atol=1e-5)
