"""`finlora serve`'s /predict under concurrent clients: requests that wait for the model scored
together (`serve.PredictQueue`, the default) against one request at a time behind the lock.

    .venv/bin/python benchmarks/bench_serve.py runs/fpb --clients 8 --requests 8 --rounds 2

Each of `--clients` threads sends `--requests` one-sentence requests in turn (FPB sentences
when $FINLORA_FPB_DIR is set, else synthetic ones), as a service called once per news item
would see them. Both ways run in the same process on the same model, alternating; HTTP is left
out, as it costs both the same. Prints sentences/s and the mean and worst request latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finlora.config import DataConfig
from finlora.data import synthetic_sentiment
from finlora.data.loaders import load_fpb
from finlora.inference import load_run
from finlora.serve import PredictQueue


def sentences(n: int) -> list[str]:
    path = DataConfig().resolved_path()
    if path is None:
        return [e.text for e in synthetic_sentiment(n)]
    return [e.text for e in load_fpb(Path(path), "all")][:n]


def run_clients(
    send: Callable[[list[str]], Any], texts: list[str], clients: int, requests: int
) -> dict[str, float]:
    latencies: list[float] = []
    guard = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            text = texts[(c * requests + r) % len(texts)]
            start = time.perf_counter()
            send([text])
            with guard:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {
        "sentences_per_s": len(latencies) / seconds,
        "mean_latency_s": statistics.fmean(latencies),
        "max_latency_s": max(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    loaded = load_run(args.run)
    texts = sentences(args.clients * args.requests)
    lock = threading.Lock()

    def score(batch: list[str]) -> Any:
        return loaded.predict(batch, progress=False)

    def one_at_a_time(batch: list[str]) -> Any:
        with lock:
            return score(batch)

    ways = {"one_at_a_time": one_at_a_time, "batched": PredictQueue(lock, score).predict}
    score(texts[:4])  # warm-up: first-call allocations and kernel choices
    results: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, send in ways.items():
            results[name].append(run_clients(send, texts, args.clients, args.requests))
    summary = {
        name: {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}
        for name, rows in results.items()
    }
    summary["ratio"] = (
        summary["batched"]["sentences_per_s"] / summary["one_at_a_time"]["sentences_per_s"]
    )
    for name in ways:
        row = summary[name]
        print(
            f"{name:>14}: {row['sentences_per_s']:6.2f} sentences/s, latency mean "
            f"{row['mean_latency_s']:.2f} s, worst {row['max_latency_s']:.2f} s"
        )
    print(f"{'ratio':>14}: {summary['ratio']:.2f}x")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
