"""ONNX: `lmtune export RUN --format onnx` (classification, NER, QA encoders; adapters merged, the trained head in the
graph), checked with onnxruntime against PyTorch on the run's validation rows, and `OnnxModel`, which runs such a
folder where lmtune would run the PyTorch model (predict, eval, serve)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

log = logging.getLogger("lmtune")
MODEL_FILE = "model.onnx"
CONFIG_FILE = "lmtune.yaml"  # the run's config: task, labels source, data options (text pairs), max length
OUTPUTS = {"classification": ["logits"], "ner": ["logits"], "qa": ["start_logits", "end_logits"]}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOLERANCE = 1e-3  # fp32: the largest absolute logit difference allowed against PyTorch
VERIFY_ROWS = 2000  # validation rows the export is checked on (at most)


def is_onnx_folder(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() and (folder / CONFIG_FILE).is_file()


class OnnxModel(torch.nn.Module):
    """An exported model run by onnxruntime, called as the PyTorch model is (`model(**batch)` -> outputs with
    `.logits` or `.start_logits`/`.end_logits`), so every task's code runs it unchanged. CPU only."""

    def __init__(self, file: Path, config: Any, outputs: list[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.config, self.output_names = config, outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **rest: Any) -> SimpleNamespace:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, **rest}
        if "token_type_ids" in self.inputs and "token_type_ids" not in given:
            given["token_type_ids"] = torch.zeros_like(input_ids)
        feed = {name: given[name].cpu().numpy().astype(np.int64) for name in self.inputs}
        found = self.session.run(self.output_names, feed)
        return SimpleNamespace(**{name: torch.from_numpy(value) for name, value in zip(self.output_names, found)})


class _Traced(torch.nn.Module):
    """The HF model with plain tensor inputs and outputs, as the exporter traces it."""

    def __init__(self, model: Any, outputs: list[str]) -> None:
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        given = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **given)
        return tuple(out[name] for name in self.outputs)


# ONNX 23 has an Attention operator the exporter writes for scaled-dot-product attention, and onnxruntime runs it as one
# kernel: on the GPU machine's 16 cores, minilm-l6 at batch 1 in 2.2 ms against 4.6 ms with opset 18's matrix products
# and softmax (PyTorch: 6.0 ms), at batch 32 585 against 296 rows/s (PyTorch: 551).
OPSET = 23


def export_onnx(model: Any, tokenizer: Any, task_name: str, folder: Path) -> list[str]:
    """Write `folder`/model.onnx for a (merged) HF encoder: batch and sequence dynamic; returns its input names."""
    import warnings

    if task_name not in OUTPUTS:
        raise ValueError(f"ONNX export is for classification, NER and QA encoders; this run's task is {task_name!r}")
    model = model.float().cpu().eval()
    example = tokenizer(["an example input", "another, longer example input to export"], padding=True,
                        return_tensors="pt")
    inputs = [name for name in INPUTS if name in example]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Traced(model, OUTPUTS[task_name]), tuple(example[n] for n in inputs),
                          str(folder / MODEL_FILE), dynamo=True, opset_version=OPSET, input_names=inputs,
                          output_names=OUTPUTS[task_name], dynamic_shapes={n: {0: batch, 1: seq} for n in inputs},
                          verbose=False, external_data=False)
    return inputs


def quantize_int8(folder: Path) -> None:
    """model.onnx replaced by its dynamically int8-quantized form (weights int8 per output channel, activations
    quantized at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = folder / "model.pre.onnx"
    quant_pre_process(str(folder / MODEL_FILE), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared))
    gemm_as_matmul(graph.graph)
    del graph.graph.value_info[:]  # the quantizer infers the intermediate shapes anew
    onnx.save(graph, str(prepared))
    # Per output channel: on SST-2 with minilm-l6, -0.23 dev accuracy points against -1.49 per tensor (as fast).
    # Matrix products only: the quantizer takes ONNX's Attention operator for onnxruntime's own and writes an invalid
    # QAttention node for it.
    quantize_dynamic(str(prepared), str(folder / "model.int8.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"])
    prepared.unlink()
    (folder / "model.int8.onnx").replace(folder / MODEL_FILE)


def gemm_as_matmul(graph: Any) -> None:
    """Plain Gemm nodes (how some torch versions export nn.Linear) as MatMul + Add, a transposed weight as one
    transposed copy under a new name: older onnxruntime quantizers transpose such weights in place and then fail on
    the shapes recorded for the old ones ("Inferred shape and existing shape differ")."""
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in graph.initializer}
    taken = set(weights) | {i.name for i in graph.input} | {o for n in graph.node for o in n.output}

    def fresh(name: str) -> str:
        new, i = name, 0
        while new in taken:
            i += 1
            new = f"{name}_{i}"
        taken.add(new)
        return new

    transposed: dict[str, str] = {}  # a weight's transposed copy, made once however many Gemms share it
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        a, b, out = node.input[0], node.input[1], node.output[0]
        if attrs.get("transB", 0):
            if b not in transposed:
                transposed[b] = fresh(f"{b}_transposed")
                if b in weights:
                    graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(weights[b]).T.copy(),
                                                                     transposed[b]))
                else:
                    nodes.append(helper.make_node("Transpose", [b], [transposed[b]]))
            b = transposed[b]
        if len(node.input) > 2 and node.input[2]:
            product = fresh(f"{out}_matmul")
            nodes += [helper.make_node("MatMul", [a, b], [product]),
                      helper.make_node("Add", [product, node.input[2]], [out])]
        else:
            nodes.append(helper.make_node("MatMul", [a, b], [out]))
    del graph.node[:]
    graph.node.extend(nodes)


def compare_outputs(torch_session: Any, onnx_model: OnnxModel, features: Any) -> dict[str, Any]:
    """PyTorch and onnxruntime on the same batches: the largest absolute output difference over real tokens and how
    many predictions (argmax per row / token / span end) differ."""
    from lmtune.training.passes import iterate_outputs

    s = torch_session
    # One pass after the other, never interleaved: each holds torch.inference_mode while it is suspended, and two
    # interleaved would leave it switched on when they end.
    theirs = list(iterate_outputs(onnx_model, features, s.collate, s.batch_size, s.accelerator, width=s.width))
    ours = iterate_outputs(s.model, features, s.collate, s.batch_size, s.accelerator, width=s.width)
    worst, differ, total = 0.0, 0, 0
    for (_, a, _), (_, b, _) in zip(ours, theirs):
        for name in onnx_model.output_names:
            x, y = getattr(a, name).float().cpu(), getattr(b, name).float()
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
            differ += int((x.argmax(-1) != y.argmax(-1)).sum())  # per row (classes), token (tags), span end (QA)
            total += x.argmax(-1).numel()
    return {"max_abs_difference": worst, "predictions_compared": total, "predictions_differing": differ}


def write_onnx_folder(folder: Path, session: Any, model: Any, quantize: str | None) -> dict[str, Any]:
    """model.onnx (int8 with `quantize`), config.json (labels), lmtune.yaml (the run's config) and verification.json
    in `folder`: the export checked on the run's validation rows (test rows where it has none), fp32 within
    TOLERANCE of PyTorch with the same predictions (else an error), int8 with its metric change reported."""
    from lmtune.files import write_text

    task_name = session.cfg.task.name
    inputs = export_onnx(model, session.tokenizer, task_name, folder)
    model.config.save_pretrained(folder)
    write_text(folder / CONFIG_FILE, session.cfg.to_yaml())
    split, features = _verification_rows(session)
    fp32 = compare_outputs(session, OnnxModel(folder / MODEL_FILE, model.config, OUTPUTS[task_name]), features)
    report: dict[str, Any] = {"split": split, "rows": len(features), "inputs": inputs, "tolerance": TOLERANCE,
                              "fp32": fp32}
    log.info("ONNX export checked on %d %s rows: largest logit difference %.2e, %d of %d predictions differ",
             len(features), split, fp32["max_abs_difference"], fp32["predictions_differing"],
             fp32["predictions_compared"])
    if fp32["max_abs_difference"] > TOLERANCE or fp32["predictions_differing"]:
        raise ValueError(f"the ONNX export does not match PyTorch on the run's {split} rows: largest logit difference "
                         f"{fp32['max_abs_difference']:.3g} (allowed {TOLERANCE}), {fp32['predictions_differing']} of "
                         f"{fp32['predictions_compared']} predictions differ; nothing was written")
    if quantize == "int8":
        quantize_int8(folder)
        int8 = OnnxModel(folder / MODEL_FILE, model.config, OUTPUTS[task_name])
        before = session.task.evaluate(session.outputs(features), features)[0]
        after = session.task.evaluate(session.outputs(features, int8), features)[0]
        report["int8"] = {**compare_outputs(session, int8, features),
                          "metrics_pytorch": before, "metrics_int8": after,
                          "change": {k: after[k] - before[k] for k in before if k in after and k != "loss"}}
        log.info("int8: %s", ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in report["int8"]["change"]))
    write_text(folder / "verification.json", json.dumps(report, indent=2))
    return report


def _verification_rows(session: Any) -> tuple[str, Any]:
    """The run's validation rows (at most VERIFY_ROWS), read again as the run read them; test rows where it had no
    validation."""
    splits, _ = session.task.load_splits(session.cfg.train.seed)
    split = "validation" if len(splits.get("validation") or []) else "test"
    if not len(splits.get(split) or []):
        raise ValueError("the run has neither validation nor test rows to check the ONNX export on")
    rows = splits[split]
    return split, session.encode(rows.select(range(min(len(rows), VERIFY_ROWS))))
