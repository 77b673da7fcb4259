"""`lmtune serve`: a real server process on a free port answering real HTTP: every task, batching of concurrent
requests (each answer to its own caller), clear 4xx for bad requests, and SIGTERM answering what is in flight."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lmtune

httpx = pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen | None = None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} never became ready")


def start(folder: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, "-m", "lmtune.cli", "serve", str(folder), "--port", str(port),
                                "--device", "cpu", *options], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process)
    return process, url


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir: Path) -> Path:
    from helpers import make_sentiment_rows, write_csv

    root = tmp_path_factory.mktemp("serve")
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(write_csv(root / "train.csv", make_sentiment_rows(64, seed=1))),
                    "validation_size": 0.25},
           "task": {"name": "classification"}, "method": {"name": "full"},
           "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3}, "output": {"dir": str(root), "name": "run"}}
    return lmtune.train(cfg).run_dir


@pytest.fixture(scope="module")
def server(run: Path):
    process, url = start(run, "--max-wait-ms", "50", "--max-inputs", "40")
    yield url
    process.terminate()
    process.wait(30)


TEXTS = [f"{w} film number {i}" for i, w in enumerate(["great", "awful", "fine", "terrible", "lovely"] * 8)]


def test_single_and_list_inputs_answer_what_predict_writes(server: str, run: Path) -> None:
    expected = lmtune.load(run).predict(TEXTS[:3])
    one = httpx.post(f"{server}/v1/predict", json={"inputs": TEXTS[0]})
    assert one.status_code == 200 and one.json()["predictions"][0]["label"] == expected[0]["label"]
    assert one.json()["predictions"][0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)
    several = httpx.post(f"{server}/v1/predict", json={"inputs": [TEXTS[0], {"text": TEXTS[1]}, TEXTS[2]]}).json()
    assert [p["label"] for p in several["predictions"]] == [p["label"] for p in expected]
    assert not any("truncated" in p for p in several["predictions"])
    long = httpx.post(f"{server}/v1/predict", json={"inputs": ["great film " * 100, "fine"]}).json()["predictions"]
    assert long[0]["truncated"] is True and "truncated" not in long[1]  # cut to the model's 64 tokens, and said
    info = httpx.get(f"{server}/v1/info").json()
    assert info["task"] == "classification" and info["labels"] == ["negative", "positive"]
    assert info["runtime"] == "pytorch" and "validation/accuracy" in info["metrics"]
    assert httpx.get(f"{server}/docs").status_code == 200 and "/v1/predict" in httpx.get(
        f"{server}/openapi.json").json()["paths"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server: str, run: Path) -> None:
    expected = {t: p["label"] for t, p in zip(TEXTS, lmtune.load(run).predict(TEXTS))}
    before = httpx.get(f"{server}/v1/info").json()["batches"]
    barrier = threading.Barrier(32)

    def ask(text: str) -> tuple[str, dict]:
        barrier.wait()
        return text, httpx.post(f"{server}/v1/predict", json={"inputs": [text]}, timeout=60).json()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, TEXTS[:32]))
    for text, answer in answers:
        assert [p["label"] for p in answer["predictions"]] == [expected[text]], text
    info = httpx.get(f"{server}/v1/info").json()
    assert info["batches"] - before < 32 and info["largest_batch"] > 1  # several requests shared passes


def test_a_bad_request_among_concurrent_ones_fails_alone_and_names_its_input(server: str, run: Path) -> None:
    """Inputs are checked in the pass they join: a bad one fails that pass, and each request is then answered alone
    (the good ones as predict answers them, the bad one with a 422 naming its index, also past the first pass)."""
    expected = {t: p["label"] for t, p in zip(TEXTS, lmtune.load(run).predict(TEXTS))}
    bodies = [{"inputs": [t]} for t in TEXTS[:15]] + [{"inputs": ["fine", {"txt": "typo"}]}]
    barrier = threading.Barrier(len(bodies))

    def ask(body: dict) -> httpx.Response:
        barrier.wait()
        return httpx.post(f"{server}/v1/predict", json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(ask, bodies))
    for body, answer in zip(bodies[:-1], answers):
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == expected[body["inputs"][0]]
    assert answers[-1].status_code == 422 and answers[-1].json()["index"] == 1
    assert answers[-1].json()["error"].startswith("inputs[1]")
    late = httpx.post(f"{server}/v1/predict", json={"inputs": ["fine"] * 35 + [{"txt": "typo"}]})  # passes of 32
    assert late.status_code == 422 and late.json()["index"] == 35 and late.json()["error"].startswith("inputs[35]")


@pytest.mark.parametrize("body, status, words", [
    (b'{"inputs": ["unclosed', 400, "malformed JSON"),
    (b'{"input": "typo"}', 422, "inputs: Field required"),
    (b'{"inputs": "ok", "temperature": 1}', 422, "temperature: unknown field"),
    (b'{"inputs": 5}', 422, "inputs"),
    (b'{"inputs": ["fine", "  "]}', 422, "inputs[1]: empty text"),
    (b'{"inputs": ["fine", {"txt": "typo"}]}', 422, "inputs[1]"),
    (b'{"inputs": []}', 422, "empty list"),
    (b'{"inputs": ["x"], "max_new_tokens": 3}', 422, "does not generate"),
    (('{"inputs": [' + ", ".join(['"a"'] * 41) + "]}").encode(), 413, "at most 40"),
    (b'{"inputs": "' + b"a" * 1_100_000 + b'"}', 413, "body too large"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem_and_the_server_goes_on(server: str, body: bytes, status: int,
                                                                             words: str) -> None:
    answer = httpx.post(f"{server}/v1/predict", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"] and "Traceback" not in answer.text
    assert httpx.post(f"{server}/v1/predict", json={"inputs": "still fine"}).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413_too(server: str) -> None:
    def chunks():  # no Content-Length: the limit is found as the body arrives
        yield b'{"inputs": "'
        for _ in range(12):
            yield b"a" * 100_000
        yield b'"}'

    answer = httpx.post(f"{server}/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "body too large" in answer.json()["error"], answer.text
    assert httpx.post(f"{server}/v1/predict", json={"inputs": "still fine"}).status_code == 200


def test_sigterm_answers_the_request_in_flight_then_exits(run: Path) -> None:
    process, url = start(run, "--max-wait-ms", "2000")  # a lone request waits 2 s for company
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}/v1/predict", json={"inputs": "great film"}, timeout=60)
        time.sleep(0.7)
        process.send_signal(signal.SIGTERM)
        answer = pending.result()
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in ("negative", "positive")
    assert process.wait(30) in (0, -signal.SIGTERM)  # (uvicorn ends by the signal again once it has shut down)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


# ---- every task, each behind a server in this process (uvicorn on a free port) --------------------------------------
@pytest.mark.parametrize("task", ["ner", "qa", "causal_lm", "instruct"])
def test_every_task_answers_single_and_list_inputs(task: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    import uvicorn

    from lmtune.serving.server import create_app
    from test_smoke import DECODER_TASKS, SMOKE_DATA, TASK_OPTIONS

    data, inputs = SMOKE_DATA[task](tmp_path)
    model = request.getfixturevalue("tiny_decoder_dir" if task in DECODER_TASKS else "tiny_model_dir")
    cfg = {"model": {"name": str(model)}, "data": data,
           "task": {"name": task, **TASK_OPTIONS.get(task, {}), **({"max_new_tokens": 4} if task in DECODER_TASKS
                                                                   else {})},
           "method": {"name": "full"}, "train": {"max_steps": 2, "batch_size": 4},
           "output": {"dir": str(tmp_path / "runs"), "name": task}}
    folder = lmtune.train(cfg).run_dir
    expected = lmtune.load(folder).predict(inputs)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(folder, device="cpu"), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        one = httpx.post(f"{url}/v1/predict", json={"inputs": inputs[0]}, timeout=60).json()["predictions"]
        several = httpx.post(f"{url}/v1/predict", json={"inputs": inputs}, timeout=60).json()["predictions"]
        assert one == expected[:1] and several == expected
        info = httpx.get(f"{url}/v1/info").json()
        assert info["task"] == task and (("entity_types" in info) == (task == "ner"))
        if task in DECODER_TASKS:
            capped = httpx.post(f"{url}/v1/predict", json={"inputs": inputs[0], "max_new_tokens": 5})
            assert capped.status_code == 422 and "at most 4" in capped.json()["error"]
            fewer = httpx.post(f"{url}/v1/predict", json={"inputs": inputs[0], "max_new_tokens": 1}, timeout=60)
            assert fewer.status_code == 200 and len(fewer.json()["predictions"][0]["generated"]) <= \
                len(one[0]["generated"]) + 1
            from fastapi.testclient import TestClient

            from lmtune.serving.server import Limits

            with TestClient(create_app(folder, Limits(max_new_tokens=1), device="cpu")) as client:  # the server's cap
                unnamed = client.post("/v1/predict", json={"inputs": inputs[0]}).json()["predictions"][0]
            assert len(unnamed["generated"].split()) <= 1  # also bounds a request that names no max_new_tokens
    finally:
        server.should_exit = True
        thread.join(30)
