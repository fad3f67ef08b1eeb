"""Throughput and latency of ``chatft serve`` on a model folder, at several concurrencies.

Starts the real server (``python -m chatft serve``) on a free loopback port, then for each
concurrency C runs C clients that each send streaming chat requests back to back. Every
answer has the same length (``ignore_eos`` with ``max_tokens``), so levels compare equal
work. Reports requests/s, generated tokens/s, end-to-end latency and time to first token
(p50/p95), prints a table and a last line of JSON, and writes
``bench/results/serve_<label>.json`` with the command, versions and hardware.

    python bench/serve_speed.py MODEL_DIR --label cpu_smollm2
    python bench/serve_speed.py MODEL_DIR --device cuda --label h100_qwen7b --max-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib import environment  # noqa: E402
from bench.lib.measure import percentile  # noqa: E402

RESULTS = REPO / "bench" / "results"
QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarize the plot of a detective story you like.",
    "How do I boil an egg?",
    "What should I pack for a weekend hiking trip in the mountains in autumn?",
]


def start_server(model_dir: str, device: str, dtype: str, max_batch_size: int
                 ) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "chatft", "serve", model_dir, "--port", "0", "--device", device,
           "--dtype", dtype, "--max-batch-size", str(max_batch_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    for line in proc.stdout:
        log.append(line)
        if "chatft: serving" in line:
            url = line.split(" on ")[1].split()[0]
            threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
            return proc, url, log
    proc.wait()
    sys.exit("the server did not start:\n" + "".join(log))


async def one_request(session: aiohttp.ClientSession, url: str, question: str,
                      args: argparse.Namespace) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    usage = None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0,
            "completion_tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"]}


async def run_level(url: str, concurrency: int, n_requests: int, args: argparse.Namespace) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[dict] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await one_request(session, url, QUESTIONS[i % len(QUESTIONS)], args))

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["completion_tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 3),
            "generated_tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(percentile(lat, 50), 3),
            "latency_p95_s": round(percentile(lat, 95), 3),
            "ttft_p50_s": round(percentile(ttft, 50), 3),
            "ttft_p95_s": round(percentile(ttft, 95), 3),
            "completion_tokens": tokens,
            "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in results), 1)}


def model_summary(folder: Path) -> dict:
    """Shape facts from config.json (enough to tell a 135M model from a 7B one)."""
    cfg = json.loads((folder / "config.json").read_text())
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "torch_dtype", "dtype")
    out = {k: cfg[k] for k in keys if k in cfg}
    out["weights_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--label", help="result file name: serve_<label>.json "
                                    "(default: <device>_<folder name>)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level (default: max(8, 2 x concurrency))")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the result file")
    args = ap.parse_args()

    label = args.label or f"{args.device.replace(':', '')}_{Path(args.model_dir).name}"
    levels = [int(c) for c in args.concurrency.split(",")]
    hw = environment.hardware(args.device)
    proc, url, log = start_server(args.model_dir, args.device, args.dtype, args.max_batch_size)
    try:
        warm = argparse.Namespace(**{**vars(args), "max_tokens": 8})
        asyncio.run(run_level(url, 2, 2, warm))  # first-call costs (allocations, kernels)
        rows = []
        for c in levels:
            n = args.requests or max(8, 2 * c)
            rows.append(asyncio.run(run_level(url, c, n, args)))
            r = rows[-1]
            print(f"  concurrency {c:>3}: {r['requests']} requests in {r['wall_s']:.1f} s",
                  file=sys.stderr, flush=True)
        health = asyncio.run(_get_json(url + "/health"))
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    header = ("conc", "reqs", "req/s", "gen tok/s", "lat p50", "lat p95", "ttft p50", "ttft p95")
    print(f"{header[0]:>5} {header[1]:>5} {header[2]:>7} {header[3]:>10} {header[4]:>8} "
          f"{header[5]:>8} {header[6]:>9} {header[7]:>9}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['requests_per_s']:>7.2f} "
              f"{r['generated_tokens_per_s']:>10.1f} {r['latency_p50_s']:>7.2f}s "
              f"{r['latency_p95_s']:>7.2f}s {r['ttft_p50_s']:>8.2f}s {r['ttft_p95_s']:>8.2f}s")
    result = {
        "benchmark": "serve_speed", "label": label,
        "command": "python " + shlex.join(sys.argv),
        "model_dir": str(Path(args.model_dir).resolve()),
        "model": model_summary(Path(args.model_dir)),
        "settings": {"device": args.device, "dtype": args.dtype, "max_tokens": args.max_tokens,
                     "temperature": args.temperature, "top_p": args.top_p,
                     "max_batch_size": args.max_batch_size, "ignore_eos": True,
                     "streaming": True},
        "versions": environment.versions(("aiohttp",)), "hardware": hw,
        "server_stats": health,
        "levels": rows,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_{label}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result))


async def _get_json(url: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.json()


if __name__ == "__main__":
    main()
