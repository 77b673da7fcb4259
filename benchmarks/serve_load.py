"""Load on `lmtune serve`: N concurrent clients each send R single-sentence requests, against the server with dynamic
batching and against the same server with --max-batch-size 1; throughput, p50/p99 latency, failures, and every answer
checked against the run's own prediction for that sentence.

    python benchmarks/serve_load.py RUN --texts ../shared/data/sst2/dev.tsv [--clients 64] [--requests 200]
        [--device cpu|cuda] [--max-wait-ms 5] [--max-batch-size 64] [--client-processes N]

Prints one JSON line per configuration and a Markdown table. Needs httpx (the dev extra)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run: str, device: str, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lmtune.cli", "serve", run, "--port", str(port), "--device",
                                device, *options], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server never became ready")


async def _clients(url: str, texts: list[str], first: int, clients: int, requests: int) -> dict:
    """`clients` concurrent clients (numbered from `first`), each sending `requests` requests one after the other."""
    latencies: list[float] = []
    answers: dict[str, str] = {}
    failures = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def one_client(c: int) -> None:
            nonlocal failures
            for r in range(requests):
                text = texts[(c * requests + r) % len(texts)]
                started = time.perf_counter()
                try:
                    reply = await client.post("/v1/predict", json={"inputs": text})
                    latencies.append(time.perf_counter() - started)
                    if reply.status_code != 200:
                        failures += 1
                    else:
                        answers.setdefault(text, reply.json()["predictions"][0]["label"])
                except httpx.HTTPError:
                    failures += 1
        await asyncio.gather(*(one_client(c) for c in range(first, first + clients)))
    return {"latencies": latencies, "answers": answers, "failures": failures}


def _share(url: str, texts: list[str], first: int, clients: int, requests: int, start_at: float) -> dict:
    time.sleep(max(0.0, start_at - time.time()))  # every client process starts at the same moment
    result = asyncio.run(_clients(url, texts, first, clients, requests))
    return {**result, "ended": time.time()}


def load(url: str, texts: list[str], clients: int, requests: int, processes: int) -> dict:
    """The clients spread over `processes` client processes (one Python process's HTTP client tops out at a few
    hundred requests a second, below what a batching server answers)."""
    import concurrent.futures

    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    firsts = [sum(shares[:i]) for i in range(processes)]
    start_at = time.time() + 2.0
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        parts = list(pool.map(_share, [url] * processes, [texts] * processes, firsts, shares,
                              [requests] * processes, [start_at] * processes))
    wall = max(p["ended"] for p in parts) - start_at
    latencies = sorted(x for p in parts for x in p["latencies"])
    info = httpx.get(f"{url}/v1/info", timeout=30).json()
    return {"requests": clients * requests, "failed": sum(p["failures"] for p in parts), "seconds": round(wall, 2),
            "requests_per_second": round(clients * requests / wall, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
            "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99) - 1], 2),
            "passes": info["batches"], "largest_batch": info["largest_batch"], "device": info["device"],
            "client_processes": processes, "answers": {k: v for p in parts for k, v in p["answers"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--texts", required=True, help="a TSV/CSV with a `sentence` or `text` column")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-wait-ms", default="5")
    parser.add_argument("--max-batch-size", default="64")
    parser.add_argument("--client-processes", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)),
                        help="processes the clients are spread over (default: a quarter of the cores, at most 4)")
    args = parser.parse_args()
    with open(args.texts, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if args.texts.endswith(".tsv")
                    else csv.DictReader(f))
    texts = [r.get("sentence") or r["text"] for r in rows]
    import lmtune

    reference = {t: p["label"] for t, p in zip(texts, lmtune.load(args.run, device=args.device).predict(texts))}
    results = []
    for name, options in (("dynamic batching", ["--max-batch-size", args.max_batch_size, "--max-wait-ms",
                                                args.max_wait_ms]),
                          ("--max-batch-size 1", ["--max-batch-size", "1"])):
        process, url = start(args.run, args.device, *options)
        try:
            asyncio.run(_clients(url, texts[:64], 0, 4, 4))  # warm-up
            result = load(url, texts, args.clients, args.requests, args.client_processes)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        answers = result.pop("answers")
        result.update(config=name, wrong_answers=sum(reference[t] != label for t, label in answers.items()),
                      checked=len(answers))
        print(json.dumps(result), flush=True)
        results.append(result)
    base = results[1]
    print("\n| server | requests/s | p50 ms | p99 ms | failed | answers differing from predict | passes |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} ({r['device']}) | {r['requests_per_second']} "
              f"({r['requests_per_second'] / base['requests_per_second']:.2f}x) | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['failed']} | {r['wrong_answers']} of {r['checked']} | {r['passes']} |")


if __name__ == "__main__":
    main()
