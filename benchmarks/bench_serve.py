"""`finlora serve` under load, and /predict's batching of concurrent requests.

Under load (`--load`): the real `finlora serve RUN` process on a free port, and `--clients`
threads each sending `--requests` requests over keep-alive connections, most of them good (1-3
sentences), the others what a server in the open must refuse: 10% with a text far past
--max-text-chars (422), 5% with more texts than --max-texts (422), 5% malformed JSON (422) and 2%
50 MB bodies, half announced by Content-Length and half chunked (413). Prints the requests by
status code, the latency of the good ones, and the server's RSS before the load (after a
warm-up of `--warmup` requests a client) and after it.

    .venv/bin/python benchmarks/bench_serve.py runs/serve-bench --load --clients 16 --requests 500

Batching (without `--load`): `serve.PredictQueue`, which scores the requests waiting for the model
together, against one request at a time behind the lock. Each of `--clients` threads sends
`--requests` one-sentence requests in turn; both ways run in this process on the same model,
alternating, HTTP left out as it costs both the same.

    .venv/bin/python benchmarks/bench_serve.py runs/fpb --clients 8 --requests 8 --rounds 2

Sentences are FPB's when $FINLORA_FPB_DIR is set, else synthetic ones.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from finlora.config import DataConfig
from finlora.data import synthetic_sentiment
from finlora.data.loaders import load_fpb


def sentences(n: int) -> list[str]:
    path = DataConfig().resolved_path()
    if path is None:
        return [e.text for e in synthetic_sentiment(n)]
    return [e.text for e in load_fpb(Path(path), "all")][:n]


# ---- under load --------------------------------------------------------------------------------

# The share of each kind of bad request; the rest are good. Sizes are past the server's default
# limits (ServeLimits): 8,000 characters a text, 1,024 texts, 4 MiB a body.
BAD_SHARES = {"oversize_text": 0.10, "too_many_texts": 0.05, "malformed_json": 0.05,
              "huge_body": 0.02}  # fmt: skip
OVERSIZE_TEXT = ("Net sales rose. " * 20_000)[:200_000]
TOO_MANY_TEXTS = 1025
HUGE_BYTES = 50_000_000
PIECE = b"x" * 100_000
# RSS is read this long after the last request: past the 2 s after which an idle server hands
# freed memory back (serve_limits.TrimWhenIdle), as it would be between bursts.
IDLE_S = 5


def _kind(rng: random.Random) -> str:
    x = rng.random()
    for kind, share in BAD_SHARES.items():
        if x < share:
            return kind
        x -= share
    return "good"


def _body(kind: str, rng: random.Random, texts: list[str]) -> bytes:
    if kind == "good":
        return json.dumps({"texts": rng.sample(texts, rng.randint(1, 3))}).encode()
    if kind == "oversize_text":
        return json.dumps({"texts": [OVERSIZE_TEXT]}).encode()
    if kind == "too_many_texts":
        return json.dumps({"texts": [texts[0]] * TOO_MANY_TEXTS}).encode()
    return b'{"texts": ["Net sales rose 5 %.", }'  # malformed_json


def _huge(port: int, chunked: bool) -> int:
    """A 50 MB body written by hand, stopped when the server answers: its status."""
    if chunked:
        header = b"Transfer-Encoding: chunked\r\n"
        pieces: Iterator[bytes] = (
            b"%x\r\n" % len(PIECE) + PIECE + b"\r\n" for _ in range(HUGE_BYTES // len(PIECE))
        )
    else:
        header = b"Content-Length: %d\r\n" % HUGE_BYTES
        pieces = (PIECE for _ in range(HUGE_BYTES // len(PIECE)))
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        head = b"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        sock.sendall(head + header + b"\r\n")
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:  # answered: the rest is not wanted
                break
            try:
                sock.sendall(piece)
            except OSError:  # closed by the server after its answer
                break
        return int(sock.recv(4096).split(b" ", 2)[1])


class _Client:
    """One keep-alive connection; http.client opens a new one after a `Connection: close`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def send(self, kind: str, body: bytes, chunked: bool) -> int:
        if kind == "huge_body":
            return _huge(self.port, chunked)
        try:
            self.conn.request("POST", "/predict", body, {"content-type": "application/json"})
            response = self.conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            self.conn.close()
            raise


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _start_server(run: Path, port: int, server_args: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "finlora.cli", "serve", str(run), "--port", str(port)]
    proc = subprocess.Popen(
        [*command, *server_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"finlora serve exited with status {proc.returncode}") from None
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("finlora serve did not come up in 300 s")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _clients(
    port: int, texts: list[str], clients: int, requests: int, seed: int
) -> tuple[Counter[tuple[str, str]], list[float], float]:
    """`clients` threads of `requests` requests each: (kind, status) counts, the good requests'
    latencies, and the seconds it all took."""
    statuses: Counter[tuple[str, str]] = Counter()
    good_latencies: list[float] = []
    guard = threading.Lock()

    def client(c: int) -> None:
        me = _Client(port)
        rng = random.Random(seed * 1000 + c)
        for _ in range(requests):
            kind = _kind(rng)
            body = _body(kind, rng, texts)
            start = time.perf_counter()
            try:
                status = str(me.send(kind, body, chunked=rng.random() < 0.5))
            except (OSError, http.client.HTTPException) as exc:
                status = f"error: {type(exc).__name__}"
            seconds = time.perf_counter() - start
            with guard:
                statuses[kind, status] += 1
                if kind == "good" and status == "200":
                    good_latencies.append(seconds)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, good_latencies, time.perf_counter() - start


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    texts = sentences(2000)
    port = _free_port()
    proc = _start_server(args.run, port, args.server_args)
    try:
        rss_loaded = _rss_mib(proc.pid)
        # A warm-up of the same mix: the RSS of a fresh server climbs over its first few hundred
        # requests, as the math libraries keep kernels and buffers for each new batch shape, and
        # then stays. "before" is that level, as in a server that has been up a while.
        _clients(port, texts, args.clients, args.warmup, seed=0)
        time.sleep(IDLE_S)
        rss_before = _rss_mib(proc.pid)
        statuses, good_latencies, seconds = _clients(
            port, texts, args.clients, args.requests, seed=1
        )
        time.sleep(IDLE_S)
        rss_after = _rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    by_status = Counter[str]()
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, status), n in sorted(statuses.items()):
        by_status[status] += n
        by_kind.setdefault(kind, {})[status] = n
    server_errors = sum(n for s, n in by_status.items() if s.startswith("5") and s != "503")
    return {
        "clients": args.clients,
        "requests": sum(by_status.values()),
        "seconds": round(seconds, 1),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": by_kind,
        "5xx_not_503": server_errors,
        "good_latency_s": {
            "p50": round(_percentile(good_latencies, 50), 3),
            "p99": round(_percentile(good_latencies, 99), 3),
            "max": round(max(good_latencies), 3),
        },
        "good_per_s": round(len(good_latencies) / seconds, 2),
        "rss_mib": {
            "loaded": round(rss_loaded),
            "before": round(rss_before),
            "after": round(rss_after),
            "after_over_before": round(rss_after / rss_before, 3),
        },
    }


# ---- batching ----------------------------------------------------------------------------------


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


def run_batching(args: argparse.Namespace) -> dict[str, Any]:
    from finlora.inference import load_run
    from finlora.serve import PredictQueue

    loaded = load_run(args.run)
    texts = sentences(args.clients * args.requests)
    lock = threading.Lock()

    def score(batch: list[str]) -> Any:
        return loaded.predict(batch, progress=False)

    def one_at_a_time(batch: list[str]) -> Any:
        with lock:
            return score(batch)

    batched = PredictQueue(lock, score, loaded.cfg.speed.eval_batch_size).predict
    ways = {"one_at_a_time": one_at_a_time, "batched": batched}
    score(texts[:4])  # warm-up: first-call allocations and kernel choices
    results: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, send in ways.items():
            results[name].append(run_clients(send, texts, args.clients, args.requests))
    summary: dict[str, Any] = {
        name: {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}
        for name, rows in results.items()
    }
    summary["ratio"] = (
        summary["batched"]["sentences_per_s"] / summary["one_at_a_time"]["sentences_per_s"]
    )
    return summary


def print_batching(summary: dict[str, Any]) -> None:
    for name in ("one_at_a_time", "batched"):
        row = summary[name]
        print(
            f"{name:>14}: {row['sentences_per_s']:6.2f} sentences/s, latency mean "
            f"{row['mean_latency_s']:.2f} s, worst {row['max_latency_s']:.2f} s"
        )
    print(f"{'ratio':>14}: {summary['ratio']:.2f}x")


def print_load(summary: dict[str, Any]) -> None:
    print(f"{summary['requests']} requests from {summary['clients']} clients in "
          f"{summary['seconds']} s")  # fmt: skip
    print("by status: " + ", ".join(f"{s}: {n}" for s, n in summary["by_status"].items()))
    for kind, row in summary["by_kind"].items():
        print(f"  {kind:>15}: " + ", ".join(f"{s}: {n}" for s, n in row.items()))
    latency, rss = summary["good_latency_s"], summary["rss_mib"]
    print(f"good requests: p50 {latency['p50']} s, p99 {latency['p99']} s, max {latency['max']} s, "
          f"{summary['good_per_s']}/s")  # fmt: skip
    print(f"server RSS: {rss['loaded']} MiB loaded, {rss['before']} MiB before the load, "
          f"{rss['after']} MiB after ({rss['after_over_before']:.3f}x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--load", action="store_true", help="the real server under load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--rounds", type=int, default=2, help="batching only")
    parser.add_argument("--warmup", type=int, default=50, help="load: requests per client")
    parser.add_argument("--server-args", nargs="*", default=[], help="for `finlora serve`")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()

    summary = run_load(args) if args.load else run_batching(args)
    if args.json:
        print(json.dumps(summary))
    elif args.load:
        print_load(summary)
    else:
        print_batching(summary)


if __name__ == "__main__":
    main()
