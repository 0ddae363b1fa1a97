"""Throughput and latency of the local service (`agent serve`) on the CPU: images per second and
p50/p95 latency at 1, 4 and 8 concurrent clients, each sending the sample photo
(agent/assets/sample.png, 451x300) as the extension does. Writes bench/results/serve.json and
its section of docs/benchmarks.md.

    OMP_NUM_THREADS=<cores> .venv/bin/python bench/serve.py [--requests 48] [--levels 1 4 8]

The app is the one `agent serve` runs (make_app with the default ServerOptions: 1 worker, a queue of
4), listening on a free 127.0.0.1 port, with the model loaded before the first request as
`agent serve` does. The rate limit is lifted (it is per token and would measure pacing, not the
service). Each client has its own token, and when the queue is full it does what the extension
does: wait out the 503's X-Retry-After-Ms and send again with its X-Agent-Ticket (its place in the
agent's first-come-first-served line); its latency is from the first send to the image, waits
included, and the 503s are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import keys as keystore
from agent import pipeline
from agent import store as db
from agent.atomic import write_text
from agent.service import pairing, users
from bench.sections import write_section
from agent.server import ServerOptions, make_app

RESULTS = ROOT / "bench" / "results" / "serve.json"
REPORT = ROOT / "docs" / "benchmarks.md"
SAMPLE = ROOT / "agent" / "assets" / "sample.png"
USER, PASSPHRASE = "bench", "bench passphrase"
ORIGIN = "chrome-extension://" + "abcdefghijklmnopabcdefghijklmnop"
WARM_UP = 3


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with a few dozen samples, no interpolation pretends to precision."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def protect(session: aiohttp.ClientSession, url: str, body: bytes, token: str) -> tuple[float, int]:
    """One image until it comes back: (seconds from the first send, 503s met on the way)."""
    headers = {"Authorization": f"Bearer {token}", "Origin": ORIGIN, "Content-Type": "image/png"}
    started, busy = time.perf_counter(), 0
    while True:
        async with session.post(url, data=body, headers=headers) as response:
            data = await response.read()
            if response.status == 200:
                return time.perf_counter() - started, busy
            if response.status != 503:
                raise RuntimeError(f"the agent answered {response.status}: {data[:200]!r}")
            busy += 1
            headers = {**headers, "X-Agent-Ticket": response.headers["X-Agent-Ticket"]}
            await asyncio.sleep(int(response.headers["X-Retry-After-Ms"]) / 1000)


async def level(url: str, body: bytes, tokens: list[str], concurrency: int, requests: int) -> dict:
    """`requests` images shared out among `concurrency` clients sending one after another."""
    latencies: list[float] = []
    busy = 0
    share = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    async def client(token: str, count: int) -> None:
        nonlocal busy
        async with aiohttp.ClientSession() as session:
            for _ in range(count):
                seconds, rejected = await protect(session, url, body, token)
                latencies.append(seconds)
                busy += rejected

    started = time.perf_counter()
    await asyncio.gather(*(client(tokens[i], share[i]) for i in range(concurrency)))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "seconds": round(wall, 2),
            "images_per_s": round(requests / wall, 2), "p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "p95_ms": round(percentile(latencies, 95) * 1000, 1), "busy_503": busy}


async def run(levels: list[int], requests: int, options: ServerOptions) -> list[dict]:
    body = SAMPLE.read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        users.init_user(home, USER, PASSPHRASE, kdf_n=2**14)  # the store's minimum: the unlock is not measured
        keys = keystore.unlock(keystore.key_store(home), USER, PASSPHRASE)
        factory = db.open_database(db.database_path(home))
        try:
            tokens = [pairing.redeem_code(factory, pairing.create_code(factory, USER).code, ORIGIN, user=USER,
                                          guard=pairing.FailureGuard()).token for _ in range(max(levels))]
        finally:
            factory.kw["bind"].dispose()
        pipeline.default_model()  # as `agent serve`: loaded before listening
        runner = web.AppRunner(make_app(home, keys, options), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = site._server.sockets[0].getsockname()[1]  # aiohttp exposes the bound port only here
            url = f"http://127.0.0.1:{port}/v1/protect"
            await level(url, body, tokens, 1, WARM_UP)  # first-call costs (allocations, caches) not timed
            results = []
            for concurrency in levels:
                results.append(await level(url, body, tokens, concurrency, requests))
                print(json.dumps(results[-1]), flush=True)
            return results
        finally:
            await runner.cleanup()


def report(results: dict) -> str:
    options = results["server"]
    lines = [
        f"## The local service under load (`agent serve`, {options.get('device', 'cpu')})",
        "",
        "Written by `bench/serve.py` from `bench/results/serve.json`; do not edit by hand.",
        "",
        (f"{results['requests']} requests per level of the sample photo ({results['photo']}, PNG, "
         f"{results['photo_bytes'] // 1024} KiB) to `POST /v1/protect` on 127.0.0.1, on {results['machine']} "
         f"({results['torch_threads']} torch threads). The server runs as `agent serve` does: "
         f"{options['workers']} worker(s), a queue of {options['queue']}, micro-batches of up to "
         f"{options.get('micro_batch', 1)}; beyond that it answers 503 busy with the wait until the client's "
         "turn (X-Retry-After-Ms) and a ticket that keeps its place in line, which each client waits out before "
         "sending again with the ticket, so latency includes those waits and the 503s are counted."),
        "",
        "| clients | images/s | p50 latency (ms) | p95 latency (ms) | 503 busy (retried) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in results["levels"]:
        lines.append(f"| {row['concurrency']} | {row['images_per_s']:.2f} | {row['p50_ms']:.0f} | "
                     f"{row['p95_ms']:.0f} | {row['busy_503']} |")
    lines += ["", ("Throughput is bounded by the one worker (torch already spreads one protection over the "
                   "cores): more clients add waiting, not images per second. Past the queue's size, a client "
                   "turned away waits its turn, first come first served, so the p95 latency grows with the "
                   "line, not with luck."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48, help="images per concurrency level [default: 48]")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8], help="concurrent clients")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, as `agent serve --device`")
    parser.add_argument("--micro-batch", type=int, default=1, help="as `agent serve --micro-batch` [default: 1]")
    parser.add_argument("--workers", type=int, help="[default: --micro-batch]")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the saved JSON")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(RESULTS.read_text())
    else:
        if args.requests < max(args.levels):
            parser.error("--requests must be at least the largest level, so every client sends")
        from PIL import Image

        with Image.open(SAMPLE) as image:
            width, height = image.size
        # the rate limit is per token and would measure pacing, not the service
        options = ServerOptions(rate=1000.0, burst=1000, device=args.device, micro_batch=args.micro_batch,
                                workers=args.workers or args.micro_batch)
        results = {"photo": f"{SAMPLE.relative_to(ROOT)} {width}x{height}", "photo_bytes": SAMPLE.stat().st_size,
                   "requests": args.requests, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                   "torch_threads": torch.get_num_threads(),
                   "server": {"workers": options.workers, "queue": options.queue, "device": options.device,
                              "micro_batch": options.micro_batch},
                   "levels": asyncio.run(run(args.levels, args.requests, options))}
        write_text(RESULTS, json.dumps(results, indent=2))
    text = report(results)
    write_section(REPORT, "serve", text)
    print(text)


if __name__ == "__main__":
    main()
