"""Soak a running `vlmx serve`: N concurrent streams for some minutes; prints requests/s,
errors and the server's memory (RSS) growth. Not a test; run it by hand, e.g.

    vlmx serve demo --device cpu --port 8011 &
    python scripts/soak_server.py --base-url http://127.0.0.1:8011 --pid $! --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import time
from collections import Counter

import httpx
import openai

from vlmx.demo.images import structured_image


def _data_url(width: int, height: int, variant: int) -> str:
    buf = io.BytesIO()
    structured_image(width, height, variant).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


async def soak(args: argparse.Namespace) -> None:
    images = [_data_url(64 + 16 * i, 96 - 8 * i, i) for i in range(4)]
    client = openai.AsyncOpenAI(
        base_url=f"{args.base_url}/v1",
        api_key=args.api_key,
        max_retries=0,
        http_client=httpx.AsyncClient(trust_env=False, timeout=300, limits=httpx.Limits()),
    )
    stats: Counter = Counter()
    deadline = time.monotonic() + 60 * args.minutes

    async def one_stream(worker: int) -> None:
        rng = random.Random(worker)
        while time.monotonic() < deadline:
            content: list = [{"type": "text", "text": f"Request {rng.random():.6f}: describe."}]
            for url in rng.sample(images, rng.choice((0, 1, 2))):
                content.insert(0, {"type": "image_url", "image_url": {"url": url}})
            try:
                stream = await client.chat.completions.create(
                    model=args.model,
                    messages=[{"role": "user", "content": content}],
                    max_tokens=rng.randint(4, args.max_tokens),
                    temperature=rng.choice((0.0, 0.8)),
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    if chunk.usage is not None:
                        stats["tokens"] += chunk.usage.completion_tokens
                stats["ok"] += 1
            except Exception as e:  # counted, reported, and the soak goes on
                stats["errors"] += 1
                stats[f"error:{type(e).__name__}"] += 1

    def line(elapsed: float, rss0: float | None) -> str:
        rss = rss_mib(args.pid)
        growth = "" if rss is None or rss0 is None else f", RSS {rss:.0f} MiB ({rss - rss0:+.0f})"
        kinds = {k: v for k, v in stats.items() if ":" in k}
        return (
            f"{stats['ok']} requests ({stats['ok'] / elapsed:.2f} req/s, "
            f"{stats['tokens'] / elapsed:.1f} tok/s), {stats['errors']} errors {kinds}{growth}"
        )

    warm: list[float | None] = []  # RSS after the first interval (caches and pools filled)

    async def report(start: float, rss0: float | None) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(args.report_s)
            if not warm:
                warm.append(rss_mib(args.pid))
            print(f"[{time.monotonic() - start:5.0f} s] {line(time.monotonic() - start, rss0)}")

    start = time.monotonic()
    rss0 = rss_mib(args.pid)
    await asyncio.gather(report(start, rss0), *(one_stream(i) for i in range(args.streams)))
    await client.close()
    elapsed = time.monotonic() - start
    print(f"soak: {args.streams} streams for {elapsed:.0f} s: {line(elapsed, rss0)}", flush=True)
    if warm and warm[0] is not None:
        print(
            f"RSS after the first {args.report_s:.0f} s: {warm[0]:.0f} MiB; growth since then: "
            f"{rss_mib(args.pid) - warm[0]:+.0f} MiB"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="demo")
    p.add_argument("--api-key", default="none")
    p.add_argument("--pid", type=int, default=None, help="the server's process id, for its RSS")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--report-s", type=float, default=60.0)
    asyncio.run(soak(p.parse_args()))


if __name__ == "__main__":
    main()
