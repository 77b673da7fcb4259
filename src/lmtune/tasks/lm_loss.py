"""Memory-lean causal-LM loss: cross-entropy over the vocabulary a chunk of tokens at a time.

A model's own loss materialises the logits of every token, [batch, length, vocabulary], then a float copy and
its gradient: for a 150k vocabulary and 8 x 1024 tokens that is over 12 GB, more than the weights and optimizer of
a 0.5B model. `install(model, chunk)` makes the output layer hand the hidden states through while the model trains
and gives the model a loss function that, `chunk` tokens at a time, computes the logits, their cross-entropy and at
once the gradients of the hidden states and of the output weights (so backward needs no second pass over the
vocabulary: the same matrix products as the plain loss, in the same precision). Evaluation and generation (eval
mode) see ordinary logits. Installing checks on a small input that the loss equals the model's own; a model that
changes its logits after the output layer (soft-capping, scaling) keeps its own loss.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


def _chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor, kept: torch.Tensor,
           count: torch.Tensor, grad_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: summed token losses, and the gradient of the mean loss w.r.t. the logits (in h's dtype); adds
    the output weights' gradient into `grad_weight`. Compiled on CUDA: one pass over the logits instead of five."""
    logits = F.linear(h, w, b).float()
    norm = torch.logsumexp(logits, -1)
    picked = logits.gather(-1, target[:, None]).squeeze(-1)
    loss = ((norm - picked) * kept).sum()
    probs = torch.exp(logits - norm[:, None]).scatter_add(-1, target[:, None], -torch.ones_like(picked)[:, None])
    grad = (probs * (kept / count)[:, None]).to(h.dtype)
    if grad_weight is not None:
        grad_weight.add_(grad.T @ h)
    return loss, grad


_compiled_chunk: list[Any] = []


def _chunk_function(device: torch.device) -> Any:
    if device.type != "cuda":
        return _chunk
    if not _compiled_chunk:
        _compiled_chunk.append(torch.compile(_chunk, dynamic=True))
    return _compiled_chunk[0]


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets` (-100 ignored), `chunk` rows at a time."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, count: torch.Tensor | None, grads: bool) -> torch.Tensor:
        device = hidden.device.type
        # Under autocast the products run in its dtype, as the output layer's would; logits are then upcast.
        dtype = _compute_dtype(device, weight)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        keep = targets != -100
        count = keep.sum() if count is None else torch.as_tensor(count, device=hidden.device)
        count = count.clamp(min=1).float()
        needs = [grads and need for need in ctx.needs_input_grad[:3]]
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs[2] else None
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        step = _chunk_function(hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                kept = keep[start:start + chunk]
                target = torch.where(kept, targets[start:start + chunk], 0)
                loss, grad = step(hidden[start:start + chunk].to(dtype), w, b, target, kept, count, grad_weight)
                total += loss
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = grad @ w
                if grad_bias is not None:
                    grad_bias += grad.sum(0).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        grads = [None if g is None else g.mul_(grad_output) for g in ctx.saved_tensors]  # each used once
        return grads[0], grads[1], grads[2], None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, chunk: int, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token cross-entropy of the logits `hidden @ weight.T + bias` ([..., H] hidden states, [...] targets,
    -100 ignored; over `count` targets when given), never holding more than `chunk` rows of logits."""
    # Without grad mode nothing will call backward: no gradient buffers (needs_input_grad ignores grad mode).
    return _ChunkedCrossEntropy.apply(hidden.flatten(0, -2), weight, bias, targets.flatten(), chunk, count,
                                      torch.is_grad_enabled())


def _compute_dtype(device: str, weight: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def install(model: Any, chunk: int) -> Callable[[], None] | str:
    """Give `model` (a transformers causal LM, possibly wrapped by peft) the chunked loss while it trains.

    Returns a function that undoes it, or why it cannot apply (the model keeps its own loss then)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the transformers model
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # e.g. peft's wrapper of a trained copy (modules_to_save), adapters
        return f"its output layer is a {type(head).__name__}, not a plain linear layer"
    if head.weight.dtype == torch.float16:
        return "fp16 output weights (the chunked gradients would underflow before loss scaling)"
    own_loss = base.loss_function
    checking = [False]

    def output_layer(hidden: torch.Tensor) -> torch.Tensor:
        if head.training or checking[0]:
            return hidden  # the loss below multiplies by the output weights, a chunk at a time
        return type(head).forward(head, hidden)  # the class's own (a frozen layer held in bf16 casts its input)

    def loss_function(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                      num_items_in_batch: torch.Tensor | None = None, ignore_index: int = -100,
                      shift_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        own = {"num_items_in_batch": num_items_in_batch, "ignore_index": ignore_index, "shift_labels": shift_labels}
        if not (head.training or checking[0]):
            return own_loss(logits, labels, vocab_size, **own, **kwargs)
        if _compute_dtype(logits.device.type, head.weight) == torch.float16:
            # fp16 autocast: gradients computed in the forward would underflow before the loss scale reaches them.
            return own_loss(F.linear(logits, head.weight, head.bias), labels, vocab_size, **own, **kwargs)
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        targets = shift_labels.to(logits.device)
        if ignore_index != -100:
            targets = torch.where(targets == ignore_index, -100, targets)
        return chunked_cross_entropy(logits, head.weight, head.bias, targets, chunk, num_items_in_batch)

    def undo() -> None:
        vars(head).pop("forward", None)
        vars(base).pop("_loss_function", None)

    head.forward = output_layer
    base.loss_function = loss_function
    problem = _differs(model, head, checking)
    if problem:
        undo()
        return problem
    return undo


def _differs(model: Any, head: torch.nn.Linear, checking: list[bool]) -> str | None:
    """Compare the chunked loss with the model's own on a small random input (eval mode, no dropout)."""
    param = next(model.parameters())
    vocab = head.out_features
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (2, 12), generator=generator).to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = model(input_ids=ids, labels=ids).loss
            checking[0] = True
            chunked = model(input_ids=ids, labels=ids).loss
    except Exception as error:  # noqa: BLE001  (any failure means: keep the model's own loss)
        return f"the chunked loss failed on a test input ({type(error).__name__}: {error})"
    finally:
        checking[0] = False
        model.train(was_training)
    if not torch.allclose(own.float(), chunked.float(), rtol=1e-3, atol=1e-4):
        return (f"the model's own loss differs on a test input ({float(own):.5f} vs {float(chunked):.5f}): "
                "it changes the logits after its output layer")
    return None
