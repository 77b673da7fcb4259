"""`lmtune serve`: a run (or its ONNX export) behind HTTP. POST /v1/predict {"inputs": X} -> {"predictions": [...]},
what `lmtune predict` writes for each input, in order; GET /health; GET /v1/info; OpenAPI docs at /docs. Concurrent
requests are batched (serving.batching); a bad request gets a 4xx naming the problem, never a traceback."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from lmtune.errors import DataError

log = logging.getLogger("lmtune")
Input = Union[str, dict[str, Any], list[Any]]


class PredictRequest(BaseModel):
    """One input (a text, or an object with the task's fields) or a list of inputs (a list always means several)."""

    model_config = ConfigDict(extra="forbid")
    inputs: Union[str, dict[str, Any], list[Input]] = Field(
        description='A text, an object ({"text", "text_pair"}, {"tokens"}, {"question", "context"}, {"messages"}) '
                    "or a list of them", examples=["It worked, no side effects", ["great", {"text": "awful"}]])
    max_new_tokens: Optional[int] = Field(None, ge=1, description="Decoders: at most this many tokens (bounded by "
                                                                  "the server's --max-new-tokens)")


class PredictResponse(BaseModel):
    predictions: list[dict[str, Any]]


class Limits(BaseModel):
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_inputs: int = 256  # inputs in one request
    max_body_bytes: int = 1_000_000
    max_new_tokens: Optional[int] = None  # decoders: the cap (default: the run's task.max_new_tokens)


def _error(status: int, message: str, **more: Any) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, **more}, status_code=status)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def create_app(folder: str | Path, limits: Limits | None = None, *, device: str | None = None,
               trust_remote_code: bool = False, allow_pickle: bool = False) -> Any:
    """The FastAPI app serving the run or ONNX export in `folder` (loaded here, once)."""
    from fastapi import FastAPI

    from lmtune.predict import Predictor
    from lmtune.serving.batching import Batcher, ItemsError

    limits = limits or Limits()
    predictor = Predictor(folder, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, device=device)
    task = predictor.session.task
    run_default = getattr(task.options, "max_new_tokens", None)
    cap = limits.max_new_tokens or run_default
    default = min(filter(None, (limits.max_new_tokens, run_default)), default=None)  # unnamed: the run's, capped
    batcher = Batcher(lambda items, key: predictor.predict(items, max_new_tokens=key), limits.max_batch_size,
                      limits.max_wait_ms)
    info = _info(Path(folder), predictor, limits, cap)

    @asynccontextmanager
    async def lifespan(app: Any):
        batcher.start()
        log.info("serving %s (%s, %s) on %s", folder, info["task"], info["runtime"], info["device"])
        yield
        await batcher.stop()

    app = FastAPI(title="lmtune", version="1", lifespan=lifespan,
                  description=f"{info['task']} model from {folder}: POST /v1/predict")
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    app.state.batcher = batcher
    _error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def get_info() -> dict[str, Any]:
        return {**info, "batches": batcher.batches, "largest_batch": batcher.largest}

    @app.post("/v1/predict", response_model=PredictResponse,
              responses={400: {"description": "malformed JSON"}, 413: {"description": "too many inputs, body too "
                                                                                       "large"},
                         422: {"description": "an invalid input, named by its index"}})
    async def predict(body: PredictRequest) -> Any:
        items = body.inputs if isinstance(body.inputs, list) else [body.inputs]
        problem = _request_problem(body, items, limits, task, cap)
        if problem is not None:
            return problem
        key = (body.max_new_tokens or default) if task.generates else None
        try:  # the task checks the inputs in the pass: a bad one fails the pass, then each request goes alone
            return {"predictions": await batcher.submit(list(items), key)}
        except ItemsError as failed:
            err = failed.error
            if not isinstance(err, DataError):
                raise err from None
            index = failed.start + err.row - 1 if err.row else None
            where = f"inputs[{index}]" if index is not None else "inputs"
            return _error(422, f"{where}{f'.{err.field}' if err.field else ''}: {err.message}", index=index)

    return app


def _request_problem(body: PredictRequest, items: list[Any], limits: Limits, task: Any, cap: int | None) -> Any:
    """The 4xx answer for what is wrong with the request as a whole (before the task checks each input), or None."""
    if not items:
        return _error(422, "inputs: an empty list (nothing to predict)")
    if len(items) > limits.max_inputs:
        return _error(413, f"inputs: {len(items)} inputs, at most {limits.max_inputs} in one request")
    if body.max_new_tokens is not None and (not task.generates or body.max_new_tokens > (cap or 0)):
        why = "this model does not generate text" if not task.generates else f"at most {cap} on this server"
        return _error(422, f"max_new_tokens: {why}")
    for i, item in enumerate(items):
        if isinstance(item, str) and not item.strip():
            return _error(422, f"inputs[{i}]: empty text", index=i)
    return None


def _error_handlers(app: Any) -> None:
    """Invalid bodies: 400 (not JSON) or 422 naming each field; anything else: 500 with the error, never a traceback."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> Any:
        problems = []
        for e in err.errors():
            if e.get("type") == "json_invalid":
                return _error(400, f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
            where = _field(tuple(e.get("loc", ())))
            problems.append(f"{where}: {'unknown field' if e.get('type') == 'extra_forbidden' else e.get('msg')}")
        return _error(422, "; ".join(dict.fromkeys(problems)))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> Any:
        log.exception("request failed")
        return _error(500, f"internal error ({type(err).__name__}): {err}")


def _info(folder: Path, predictor: Any, limits: Limits, cap: int | None) -> dict[str, Any]:
    from lmtune.serving.onnx import is_onnx_folder

    from lmtune.split_names import eval_split_names

    session, task = predictor.session, predictor.session.task
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8")) \
        if (folder / "metrics.json").is_file() else {}
    metric = (metrics.get("selection") or {}).get("metric")
    headline = {f"{split}/{metric}": metrics[split][metric] for split in eval_split_names(metrics)
                if metric and isinstance((metrics.get(split) or {}).get(metric), (int, float))}
    labels = getattr(task, "labels", None)
    return {"task": session.cfg.task.name, "method": session.cfg.method.name,
            "base_model": metrics.get("model", session.cfg.model.name),
            **({"entity_types": task.types} if session.cfg.task.name == "ner" else
               {"labels": labels} if labels else {}),
            "metrics": headline, "runtime": "onnx" if is_onnx_folder(folder) else "pytorch",
            "device": str(session.accelerator.device), "max_length": session.max_length,
            **limits.model_dump(exclude={"max_new_tokens"}), **({"max_new_tokens": cap} if task.generates else {})}


class _TooLarge(Exception):
    pass


class _BodyLimit:
    """413 for a body over `limit` bytes: by its Content-Length, or as it arrives (chunked)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send)
        seen, over, started = 0, False, False

        async def counted() -> dict:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise _TooLarge
            return message

        async def answer(message: dict) -> None:
            nonlocal started
            if over and not started:  # the framework's own reply to a body it could not read (400): ours instead
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted, answer)
        except _TooLarge:
            pass
        if over and not started:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        await _error(413, f"body too large: at most {self.limit:,} bytes")(scope, receive, send)


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          **options: Any) -> None:
    """Serve until SIGTERM / Ctrl-C: then new connections are refused and requests in flight are answered."""
    import datasets
    import uvicorn

    # A server prints no per-request progress bars (a datasets map per pass would write one each time, costing ms);
    # and the model's thread hands the GIL to the event loop 5x as often as by default, so requests arriving
    # while a pass runs Python (tokenizing, a GPU forward launching kernels) are read into the next batch.
    datasets.disable_progress_bars()
    sys.setswitchinterval(0.001)
    app = create_app(folder, limits, **options)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
