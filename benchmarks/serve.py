"""Serving under load: N concurrent streaming clients against the same requests sent one at a time.

    python benchmarks/serve.py                          # a random `small`, 16 clients
    python benchmarks/serve.py --model runs/sft --concurrency 16 --requests 64

Starts `nanoseek serve` on a free port, then sends streaming /v1/completions requests (random
128-token prompts, 64 new tokens each, end-of-sentence ignored so every request makes the same
number of tokens). Reports, as vLLM's and SGLang's serving benchmarks do: TTFT (time to the first
token), TPOT ((end-to-end - TTFT) / (tokens - 1)), ITL (time between streamed chunks), requests/s
and output tokens/s, with mean, median and p99; first with --concurrency clients at once, then
the same kind of requests one at a time, and the ratio of their tokens/s (--compile: the server's
decode step compiled with torch.compile, before it listens). The two runs alternate
for --rounds rounds (each round's ratio is printed) and the table sums them, because a shared
machine's speed drifts from minute to minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client: httpx.AsyncClient, url: str, prompt: list[int], new: int) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    ttft = stamps[0] - start
    return {"ttft": ttft, "tpot": (end - start - ttft) / max(tokens - 1, 1), "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens, "latency": end - start}


async def run(url: str, prompts: list[list[int]], new: int, concurrency: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def guarded(p):
            async with limit:
                return await one(client, url, p, new)
        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(p) for p in prompts))
        wall = time.perf_counter() - start
    return {"results": results, "wall": wall}


def summary(name: str, outs: list[dict]) -> dict:
    rs, wall = [r for o in outs for r in o["results"]], sum(o["wall"] for o in outs)
    tokens = sum(r["tokens"] for r in rs)

    def stats(xs):
        xs = sorted(xs)
        return (statistics.mean(xs) * 1e3, statistics.median(xs) * 1e3, xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e3)

    row = {"name": name, "requests_per_s": len(rs) / wall, "tokens_per_s": tokens / wall,
           "ttft": stats([r["ttft"] for r in rs]), "tpot": stats([r["tpot"] for r in rs]),
           "itl": stats([x for r in rs for x in r["itl"]])}
    print(f"{name:>18}: {row['requests_per_s']:6.2f} req/s  {row['tokens_per_s']:8.1f} tok/s  "
          + "  ".join(f"{k.upper()} mean/median/p99 {'/'.join(f'{v:.1f}' for v in row[k])} ms"
                      for k in ("ttft", "tpot", "itl")), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", metavar="DIR",
                    help="model dir to serve (default: a random `small` with the byte-level tokenizer's vocabulary)")
    ap.add_argument("--url", help="benchmark a server already running there (its model must be named 'm')")
    ap.add_argument("--concurrency", type=int, default=16, help="clients at once (default 16)")
    ap.add_argument("--requests", type=int, default=64, help="requests in the concurrent run (default 64)")
    ap.add_argument("--sequential", type=int, default=16, help="requests in the one-at-a-time run (default 16)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--prefill-hold", type=int, help="the server's --prefill-hold (default: the server's default)")
    ap.add_argument("--compile", action="store_true", help="serve with --compile (the server compiles before it listens)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate the concurrent and the one-at-a-time run this many times, so that drift in the "
                         "machine's speed hits both alike; the table sums the rounds (default 3)")
    args = ap.parse_args()
    if args.rounds < 1 or args.concurrency < 1 or args.requests < 1 or args.sequential < 1:
        ap.error("--rounds, --concurrency, --requests and --sequential must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and not args.url:
            import torch

            from nanoseek import Transformer, preset, save_model
            from nanoseek.tokenizer import Tokenizer
            torch.manual_seed(0)
            model = str(Path(tmp) / "small")
            tok = Tokenizer.byte_level()  # vocab cut to the tokenizer's, so every token streams some text
            save_model(Transformer(preset("small", vocab_size=tok.vocab_size)), model, extra_files=tok.files())
        port = free_port()
        url = args.url or f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", model, "--port", str(port),
               "--served-model-name", "m", "--max-running", str(args.concurrency), "--quiet"]
        if args.prefill_hold is not None:
            cmd += ["--prefill-hold", str(args.prefill_hold)]
        if args.compile:
            cmd.append("--compile")
        server = None if args.url else subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(3000):  # up to 5 minutes: a compiling server listens only once it is done
                try:
                    httpx.get(url + "/health", timeout=1)
                    break
                except httpx.HTTPError:
                    if server is not None and server.poll() is not None:
                        sys.exit(f"the server exited with status {server.returncode}: {' '.join(cmd)}")
                    time.sleep(0.1)
            rng = random.Random(0)
            prompts = [[rng.randrange(9, 250) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
            print(f"nanoseek serve, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, "
                  f"streaming /v1/completions", flush=True)
            asyncio.run(run(url, prompts[:2], 4, 1))  # warm-up
            together, alone = [], []
            for i in range(args.rounds):
                together.append(asyncio.run(run(url, prompts, args.new_tokens, args.concurrency)))
                alone.append(asyncio.run(run(url, prompts[:args.sequential], args.new_tokens, 1)))
                ratio = (summary(f"{i + 1}: {args.concurrency} at once", together[-1:])["tokens_per_s"]
                         / summary(f"{i + 1}: one at a time", alone[-1:])["tokens_per_s"])
                print(f"round {i + 1}: {ratio:.2f}x", flush=True)
            print(f"all {args.rounds} rounds:")
            ratio = (summary(f"{args.concurrency} concurrent", together)["tokens_per_s"]
                     / summary("one at a time", alone)["tokens_per_s"])
            print(f"ratio: {ratio:.2f}x the sequential tokens/s")
        finally:
            if server is not None:
                server.terminate()
                server.wait()


if __name__ == "__main__":
    main()
