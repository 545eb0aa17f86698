"""Load test of the image server: bounded concurrency, bounded time, against 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py                       # own cluster, debug model
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --duration 60
    .venv/bin/python benchmarks/serve_load.py --streaming 4          # plain load, then 4 clients streaming

Without --url it starts a local Ray cluster, deploys serve/config.yaml's application with the
debug model, and drives the same load twice: once with requests batched (`max_batch_size` from
the config) and once with batching off (`max_batch_size: 1`, the baseline), through a
`user_config` reconfigure of the running replicas. It prints, for each: p50/p95 latency,
images/s, errors by HTTP status, and the ImageModel replica count over time; then the
batched/unbatched throughput ratio.

With --streaming K it drives the same load twice on one server (its own, or --url): every
client plain, then K of them with `stream: true, partial_images: 3`; it prints both phases'
images/s and their ratio, and the streaming clients' time to the first partial image against
their time to the final one.

With --url it drives an existing server (e.g. `serve deploy serve/config.yaml` on the local
stack) once, and reads replica counts from the cluster in RAY_ADDRESS when that is set. A
server that takes API keys gets the one in $JANUS_API_KEY (not a flag: a key on the command
line shows in `ps`); mind its per-key limits, past which requests count as 429s.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import json
import os
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
APP = "janus-images"


def post(url: str, body: dict, timeout: float) -> tuple[int, float]:
    """(HTTP status, seconds); status 0 for a connection error."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("JANUS_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['JANUS_API_KEY']}"
    request = urllib.request.Request(f"{url}/v1/images/generations", data, headers)
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError):
        status = 0
    return status, time.perf_counter() - start


def post_stream(url: str, body: dict, timeout: float) -> tuple[int, float, float]:
    """A streamed request: (HTTP status, seconds to the first partial image, seconds to the end)."""
    data = json.dumps({**body, "stream": True}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("JANUS_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['JANUS_API_KEY']}"
    request = urllib.request.Request(f"{url}/v1/images/generations", data, headers)
    start = time.perf_counter()
    first = float("nan")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            for line in answer:
                if line.startswith(b"event:") and b"partial_image" in line and first != first:
                    first = time.perf_counter() - start
            status = answer.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError):
        status = 0
    return status, first, time.perf_counter() - start


def replica_count() -> int | None:
    try:
        from ray import serve
        from ray.serve._private.common import ReplicaState

        states = serve.status().applications[APP].deployments["ImageModel"].replica_states
        return states.get(ReplicaState.RUNNING, 0)
    except Exception:  # noqa: BLE001 - no cluster reachable: the count is unknown, the load goes on
        return None


def drive(url: str, concurrency: int, duration_s: float, n: int, timeout: float, label: str,
          streaming: int = 0, partial_images: int = 3) -> dict:
    """`concurrency` clients post back to back for `duration_s`, the first `streaming` of them
    with `stream: true` and `partial_images`; returns the figures."""
    latencies, statuses, replicas = [], collections.Counter(), []
    first_partial, stream_total = [], []
    lock, stop = threading.Lock(), threading.Event()
    started = time.perf_counter()

    def client(index: int) -> None:
        seed = index * 1_000_000
        while not stop.is_set():
            seed += 1
            body = {"prompt": f"a red circle number {seed % 7}", "n": n, "seed": seed}
            if index < streaming:
                status, first, seconds = post_stream(url, {**body, "partial_images": partial_images}, timeout)
            else:
                (status, seconds), first = post(url, body, timeout), None
            with lock:
                statuses[status] += 1
                if status == 200:
                    latencies.append(seconds)
                    if first is not None:
                        first_partial.append(first)
                        stream_total.append(seconds)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for index in range(concurrency):
            pool.submit(client, index)
        next_line = started
        while time.perf_counter() - started < duration_s:
            now = time.perf_counter()
            count = replica_count()
            replicas.append((round(now - started, 1), count))
            if now >= next_line:
                with lock:
                    done = sum(statuses.values())
                print(f"  [{label}] t={now - started:5.1f}s requests={done} replicas={count}", flush=True)
                next_line = now + 5
            time.sleep(1.0)
        stop.set()
    elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    ordered = sorted(latencies)
    return {
        "label": label, "seconds": elapsed, "ok": ok, "images_per_s": ok * n / elapsed,
        "p50_s": statistics.median(ordered) if ordered else float("nan"),
        "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan"),
        "statuses": dict(statuses), "replicas": replicas,
        "stream_first_partial_p50_s": statistics.median(first_partial) if first_partial else None,
        "stream_final_p50_s": statistics.median(stream_total) if stream_total else None,
    }


def report(figures: dict) -> None:
    counts = [c for _, c in figures["replicas"] if c is not None]
    timeline = " ".join(f"{t:.0f}s:{c}" for t, c in figures["replicas"][::5])
    print(f"{figures['label']}: {figures['images_per_s']:.2f} images/s, p50 {figures['p50_s']:.2f}s, "
          f"p95 {figures['p95_s']:.2f}s, statuses {figures['statuses']}")
    print(f"  replicas over time: {timeline}" + (f" (max {max(counts)})" if counts else " (unknown)"))
    if figures["stream_final_p50_s"] is not None:
        print(f"  streaming clients: first partial image after {figures['stream_first_partial_p50_s']:.2f}s, "
              f"final image after {figures['stream_final_p50_s']:.2f}s (p50)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_server(max_batch_size: int, model: str = "debug"):
    """Deploys serve/config.yaml's application with `model`; returns (url, redeploy)."""
    import ray
    from ray import serve

    from janus_lab.serving import ImageApi, ImageModel

    application = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]
    options = {d.pop("name"): d for d in copy.deepcopy(application["deployments"])}
    args = {**application["args"], "model": model}
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def deploy(batch_size: int) -> None:
        model_options = copy.deepcopy(options["ImageModel"])
        model_options["user_config"] = {**model_options.get("user_config", {}), "max_batch_size": batch_size}
        app = ImageApi.options(**options["ImageApi"]).bind(ImageModel.options(**model_options).bind(args), args)
        serve.run(app, name=APP, route_prefix="/")

    deploy(max_batch_size)
    return f"http://127.0.0.1:{port}", deploy


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing server; default: start one with the debug model")
    parser.add_argument("--concurrency", type=int, default=8, help="clients posting back to back (default 8)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load phase (default 30)")
    parser.add_argument("--n", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    parser.add_argument("--max-batch-size", type=int, default=8, help="batched phase's max_batch_size (default 8)")
    parser.add_argument("--streaming", type=int, default=0, metavar="K",
                        help="streaming mode: the same load twice, plain and then with K of the clients "
                             "streaming (partial_images 3); prints both and their throughput ratio")
    parser.add_argument("--model", default="debug", help="what the own server serves (default debug)")
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 256 or not 0 < args.duration <= 3600:
        parser.error("--concurrency must be in 1..256 and --duration in (0, 3600]")

    if args.url and os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    if args.streaming:
        url = args.url or own_server(args.max_batch_size, args.model)[0]
        print(f"load: {args.concurrency} clients x {args.duration:.0f}s per phase against {url}, n={args.n}; "
              f"then {args.streaming} of them streaming")
        post(url, {"prompt": "warm up", "seed": 0}, args.timeout)
        plain = drive(url, args.concurrency, args.duration, args.n, args.timeout, "no streaming")
        mixed = drive(url, args.concurrency, args.duration, args.n, args.timeout,
                      f"{args.streaming} of {args.concurrency} clients streaming", streaming=args.streaming)
        print()
        report(plain)
        report(mixed)
        ratio = mixed["images_per_s"] / plain["images_per_s"] if plain["images_per_s"] else float("nan")
        print(f"throughput ratio with streaming clients / without: {ratio:.2f}x")
        return 0
    if args.url:
        print(f"load: {args.concurrency} clients x {args.duration:.0f}s against {args.url}, n={args.n}")
        report(drive(args.url, args.concurrency, args.duration, args.n, args.timeout, "server"))
        return 0

    url, deploy = own_server(args.max_batch_size, args.model)
    print(f"load: {args.concurrency} clients x {args.duration:.0f}s per phase against {url} (debug model), n={args.n}")
    post(url, {"prompt": "warm up", "seed": 0}, args.timeout)
    batched = drive(url, args.concurrency, args.duration, args.n, args.timeout, f"batched (max_batch_size {args.max_batch_size})")
    deploy(1)
    settle = time.monotonic() + 90  # both phases start from one replica
    while replica_count() not in (1, None) and time.monotonic() < settle:
        time.sleep(1.0)
    post(url, {"prompt": "warm up", "seed": 0}, args.timeout)
    unbatched = drive(url, args.concurrency, args.duration, args.n, args.timeout, "unbatched (max_batch_size 1)")
    print()
    report(batched)
    report(unbatched)
    ratio = batched["images_per_s"] / unbatched["images_per_s"] if unbatched["images_per_s"] else float("nan")
    print(f"throughput ratio batched / unbatched: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
