"""An asyncio gRPC load generator for hero.vision.v1.VisionService.

    python -m loadtest.runner --target 127.0.0.1:9000 --scenario cache-hit \
        --mode open --rate 4 --requests 200 --duration 60 --out out/load.json

Open loop sends on a Poisson schedule whatever the latency; closed loop keeps a fixed
number of requests in flight. Every run is bounded by a request count and a duration,
and every request by a deadline, so a run always ends.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2, vision_pb2_grpc
from PIL import Image

from loadtest.arrivals import poisson_offsets
from loadtest.stats import Outcome, summarize

SCENARIOS = {"cache-hit": 1.0, "cache-miss": 0.0}


def photo_variant(seed: int, size: tuple[int, int] = (672, 680)) -> bytes:
    """A distinct PNG: a real photo (scikit-image's astronaut) with seeded noise."""
    import skimage.data

    base = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size[1], size[0])))
    rng = np.random.default_rng(seed)
    noisy = np.clip(base.astype(np.int16) + rng.integers(-6, 7, base.shape), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@dataclasses.dataclass
class Workload:
    """Which image and question request i uses.

    A hit reuses one of `pool` images (sent once before the run); a miss uses an image
    no request used before. Every request asks a new question.
    """

    hit_ratio: float
    pool: int = 4
    seed: int = 0
    image: Callable[[int], bytes] = photo_variant

    def __post_init__(self) -> None:
        if not 0.0 <= self.hit_ratio <= 1.0:
            raise ValueError("hit_ratio must be in [0, 1]")
        self._rng = np.random.default_rng(self.seed)
        self._pool = [self.image(1_000_000 + i) for i in range(self.pool)]

    @property
    def warm_images(self) -> list[bytes]:
        return self._pool if self.hit_ratio > 0 else []

    def request(self, i: int) -> tuple[bytes, str, bool]:
        """(image bytes, question, expected hit) of request i."""
        hit = bool(self._rng.random() < self.hit_ratio)
        image = self._pool[i % self.pool] if hit else self.image(self.seed * 100_000 + i)
        return image, f"Question {i}: what is in the part of the picture near item {i % 7}?", hit


@dataclasses.dataclass
class Settings:
    method: str = ""
    retention: float = 0.0
    max_new_tokens: int = 8
    timeout_s: float = 60.0
    ignore_eos: bool = False
    """Answers of exactly max_new_tokens (comparable runs)."""


async def one_request(stub: vision_pb2_grpc.VisionServiceStub, image: bytes, question: str,
                      settings: Settings) -> Outcome:
    start = time.perf_counter()
    outcome = Outcome(code="OK", sent_at=start)
    request = vision_pb2.GenerateRequest(
        image=vision_pb2.ImageInput(data=image), prompt=question,
        prune=vision_pb2.PruneOptions(method=settings.method, retention=settings.retention),
        params=common_pb2.GenerationParams(max_new_tokens=settings.max_new_tokens,
                                           ignore_eos=settings.ignore_eos))
    try:
        async for event in stub.Generate(request, timeout=settings.timeout_s):
            kind = event.WhichOneof("event")
            if kind == "accepted":
                outcome.cache_hit = event.accepted.cache_hit
                outcome.visual_tokens = event.accepted.tokens_kept
            elif kind == "delta":
                if outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - start
                outcome.tokens += len(event.delta.token_ids)
            elif kind == "usage":
                outcome.bytes_sent = event.usage.bytes_sent
        outcome.e2e_s = time.perf_counter() - start
    except grpc.aio.AioRpcError as exc:
        outcome.code = exc.code().name
    return outcome


class Progress:
    """A tqdm bar when asked for, silent otherwise."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="req")

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run(target: str, workload: Workload, settings: Settings, *, mode: str = "closed",
              rate_per_s: float = 1.0, concurrency: int = 1, max_requests: int = 100,
              max_duration_s: float = 60.0, progress: bool = False,
              label: str = "load") -> tuple[list[Outcome], float]:
    """Run one bounded load; returns every request's outcome and the run's duration."""
    if mode not in ("open", "closed"):
        raise ValueError("mode is open or closed")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        for image in workload.warm_images:  # the pool is cached before timing starts
            await one_request(stub, image, "warm-up question", settings)
        bar = Progress(max_requests, progress, label)
        outcomes: list[Outcome] = []
        start = time.perf_counter()
        deadline = start + max_duration_s

        async def send(i: int) -> None:
            image, question, _ = workload.request(i)
            outcomes.append(await one_request(stub, image, question, settings))
            bar.update()

        if mode == "open":
            tasks = []
            for i, offset in enumerate(poisson_offsets(rate_per_s, max_requests, workload.seed)):
                if start + offset > deadline:
                    break
                await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
                tasks.append(asyncio.create_task(send(i)))
            await asyncio.gather(*tasks)
        else:
            counter = iter(range(max_requests))

            async def worker() -> None:
                for i in counter:
                    if time.perf_counter() > deadline:
                        return
                    await send(i)

            await asyncio.gather(*[worker() for _ in range(concurrency)])
        bar.close()
        return outcomes, time.perf_counter() - start


def write_results(path: Path, runs: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=2, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:9000")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "mixed"], default="cache-hit")
    parser.add_argument("--hit-ratio", type=float, default=0.8, help="for --scenario mixed")
    parser.add_argument("--mode", choices=["open", "closed"], default="closed")
    parser.add_argument("--rate", type=float, default=2.0, help="open loop: requests/s")
    parser.add_argument("--concurrency", type=int, default=2, help="closed loop")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds at most")
    parser.add_argument("--method", default="")
    parser.add_argument("--retention", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("out/load.json"))
    parser.add_argument("--plot", type=Path, help="PNG of the latency CDFs")
    args = parser.parse_args()
    ratio = args.hit_ratio if args.scenario == "mixed" else SCENARIOS[args.scenario]
    settings = Settings(args.method, args.retention, args.max_new_tokens, args.timeout)
    outcomes, duration = asyncio.run(run(
        args.target, Workload(ratio), settings, mode=args.mode, rate_per_s=args.rate,
        concurrency=args.concurrency, max_requests=args.requests,
        max_duration_s=args.duration, progress=True, label=args.scenario))
    summary = summarize(outcomes, duration)
    write_results(args.out, {args.scenario: {"summary": summary,
                                             "outcomes": [dataclasses.asdict(o)
                                                          for o in outcomes]}})
    print(json.dumps(summary, indent=2, default=float))
    if args.plot:
        from loadtest.plots import latency_cdf

        latency_cdf({args.scenario: outcomes}, args.plot)


if __name__ == "__main__":
    main()
