"""Soak: minutes of mixed traffic against the whole local system while faults are injected
on a schedule. Every request's outcome is counted; none may be lost.

    .ci/isolated .venv/bin/python -m loadtest.soak --duration 300 --out docs/RELIABILITY.md

It starts its own system (Redis, language service, Ray Serve app; tiny model) because it
kills and restarts parts of it. The traffic mixes cache hits, misses, Prune calls, client
cancels, short deadlines and bad inputs of every kind. The first two thirds of the run
inject faults (Redis killed, Redis flapping, Redis stalled, the language service killed,
the encoder replicas killed); the last third runs fault-free and measures memory growth.

A request's outcome is `expected` (an answer, or the error its bad input deserves),
`degraded` (UNAVAILABLE or RESOURCE_EXHAUSTED: a clear, retryable error), `other` (any other
status) or `lost` (no final status by its deadline plus a grace period).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from hero.vision.v1 import vision_pb2_grpc
from PIL import Image

from loadtest.arrivals import poisson_offsets
from loadtest.bench import machine
from loadtest.runner import photo_variant
from loadtest.soak_plan import (
    GRACE_S,
    KINDS,
    LONG,
    MEMORY_PERIOD_S,
    TOKEN,
    Fault,
    Kind,
    Result,
    verdict,
)
from loadtest.soak_report import report
from services.common.auth import bearer_metadata as bearer
from services.local import LocalSystem, free_port
from services.sdk.vision import call_metadata, generate_request, prune_request


def pixel_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10_000, 8_000)).save(buf, format="PNG")
    return buf.getvalue()


class Traffic:
    """Builds and sends one request of a kind; returns its final status name."""

    def __init__(self, stub: vision_pb2_grpc.VisionServiceStub, pool: list[bytes]):
        self.stub, self.pool = stub, pool
        self.bomb = pixel_bomb()
        self.fresh = 0
        self.auth = bearer(TOKEN)

    async def send(self, kind: str, i: int) -> tuple[str, str]:
        """The call's final status name (OK for a complete answer) and its message."""
        image = self.pool[i % len(self.pool)]
        timeout, options, metadata = 30.0, {"max_new_tokens": 8}, self.auth
        if kind == "prune":
            return await self._prune(image)
        if kind == "miss":
            self.fresh += 1
            image = photo_variant(7_000_000 + self.fresh, (400, 500))
        elif kind in ("cancel", "deadline"):
            options = LONG
            timeout = 1.0 if kind == "deadline" else timeout
        elif kind == "garbage-image":
            image = os.urandom(2048)
        elif kind == "pixel-bomb":
            image = self.bomb
        elif kind == "bad-retention":
            options = {**options, "retention": 1.5}
        elif kind == "bad-method":
            options = {**options, "method": "no-such-method"}
        elif kind == "bad-params":
            options = {"max_new_tokens": 0}
        elif kind == "bad-token":
            metadata = bearer("not-the-token")
        prompt = "x" * 20_000 if kind == "long-prompt" else f"What is in picture {i}?"
        if kind == "unknown-image":
            request = generate_request(None, prompt, image_id="0" * 64, **options)
        else:
            request = generate_request(image, prompt, **options)
        return await self._generate(request, timeout, metadata, cancel=kind == "cancel")

    async def _generate(self, request: Any, timeout: float, metadata: Any,
                        cancel: bool) -> tuple[str, str]:
        call = self.stub.Generate(request, timeout=timeout,
                                  metadata=call_metadata(metadata, timeout))
        last = ""
        try:
            async for event in call:
                last = event.WhichOneof("event")
                if cancel and last == "delta":
                    call.cancel()
                    return "CANCELLED", "cancelled by the client"
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name), str(exc.details())
        return ("OK", "") if last == "usage" else ("INCOMPLETE", f"stream ended after {last}")

    async def _prune(self, image: bytes) -> tuple[str, str]:
        call = self.stub.Prune(prune_request(image, "What is here?"), timeout=30.0,
                               metadata=self.auth)
        try:
            parts = [response async for response in call]
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name), str(exc.details())
        complete = len(parts) >= 2 and parts[1].HasField("tokens")
        return ("OK", "") if complete else ("INCOMPLETE", f"{len(parts)} messages")


# ---- faults ---------------------------------------------------------------------------

class Injector:
    """Breaks and repairs parts of a `LocalSystem` on a schedule."""

    def __init__(self, system: Any):
        self.system = system

    async def redis_kill(self) -> None:
        await self.redis_kill_for(10.0)

    async def redis_flap(self) -> None:
        for _ in range(3):
            await self.redis_kill_for(3.0)
            await asyncio.sleep(3.0)

    async def redis_kill_for(self, seconds: float) -> None:
        port = self.system.redis.port
        self.system.redis.proc.kill()
        self.system.redis.proc.wait()
        await asyncio.sleep(seconds)
        self.system.redis.port = port
        await asyncio.to_thread(self.system.redis.start)

    async def redis_stall(self) -> None:
        import redis

        redis.Redis(port=self.system.redis.port).execute_command("CLIENT", "PAUSE", 8000, "ALL")
        await asyncio.sleep(8.5)

    async def language_kill(self) -> None:
        self.system.language.proc.kill()
        self.system.language.proc.wait()
        await asyncio.sleep(3)
        await asyncio.to_thread(self.system.language.start)

    async def encoder_kill(self) -> None:
        import ray

        for actor in ray.util.list_named_actors(all_namespaces=True):
            if "Encoder" in actor["name"]:
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]),
                         no_restart=True)
        await asyncio.sleep(1)


FAULTS: tuple[tuple[str, str], ...] = (
    ("redis_kill", "Redis SIGKILLed, restarted empty 10 s later"),
    ("redis_stall", "Redis stalled 8 s (CLIENT PAUSE ALL)"),
    ("language_kill", "language service SIGKILLed mid-traffic, restarted 3 s later"),
    ("redis_flap", "Redis killed and restarted 3 times, 3 s down / 3 s up"),
    ("encoder_kill", "every encoder replica killed (Serve replaces them)"),
)


# ---- memory ---------------------------------------------------------------------------

ROLES = {"VisionIngress": "vision ingress replica", "Encoder": "encoder replica",
         "ProxyActor": "Serve gRPC proxy"}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def processes(system: Any) -> dict[str, int]:
    """role -> pid of the system's long-lived processes."""
    found = {"language service": system.language.proc.pid, "redis": system.redis.proc.pid}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for marker, role in ROLES.items():
            if cmdline.startswith("ray::") and marker in cmdline:
                found[role] = int(entry)
    return found


Samples = dict[str, list[tuple[float, int, float]]]  # role -> [(s since start, pid, RSS MB)]


def sample_memory(system: Any, at_s: float, samples: Samples) -> None:
    for role, pid in processes(system).items():
        with contextlib.suppress(OSError):
            samples.setdefault(role, []).append((at_s, pid, rss_mb(pid)))


def memory_rows(samples: Samples) -> list[dict[str, Any]]:
    """Per process: its RSS series (one pid: the one alive at the end) and growth."""
    rows = []
    for role, series in sorted(samples.items()):
        last_pid = series[-1][1]
        mine = [(t, mb) for t, pid, mb in series if pid == last_pid]
        first, mid, last = mine[0][1], mine[len(mine) // 2][1], mine[-1][1]
        rows.append({"role": role, "series": mine,
                     "growth_pct": 100 * (last - first) / first,
                     "late_growth_pct": 100 * (last - mid) / mid})
    return rows


# ---- the run --------------------------------------------------------------------------

async def send_one(traffic: Traffic, kind: Kind, i: int, result: Result,
                   now: Callable[[], float]) -> None:
    """Send request `i` of `kind`; its outcome goes into `result`, listed since it was sent."""
    deadline = (1.0 if kind.name == "deadline" else 30.0) + GRACE_S
    try:
        code, details = await asyncio.wait_for(traffic.send(kind.name, i), deadline)
    except TimeoutError:
        code, details = "LOST", f"no status after {deadline:.0f} s"
    result.code, result.latency_s = code, now() - result.sent_s
    result.verdict = verdict(kind, code)
    if result.verdict != "expected":
        result.details = details[:160]


def mark_recovery(faults: list[Fault], results: list[Result]) -> None:
    """Each fault's recovery: from its end to the first answer of a request sent after."""
    for fault in faults:
        after = [r.sent_s + r.latency_s - fault.end_s for r in results
                 if r.sent_s >= fault.end_s and r.code == "OK"]
        fault.recovered_s = min(after, default=None)


async def soak(system: Any, duration_s: float, rate: float, seed: int) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(system.target)
    traffic = Traffic(vision_pb2_grpc.VisionServiceStub(channel),
                      [photo_variant(5_000_000 + i, (400, 500)) for i in range(4)])
    for image in traffic.pool:  # the hit pool is cached before the clock starts
        await traffic._generate(generate_request(image, "warm up", max_new_tokens=2), 120,
                                traffic.auth, cancel=False)
    rng = random.Random(seed)
    kinds = {k.name: k for k in KINDS}
    injector, faults = Injector(system), []
    results: list[Result] = []
    start = time.monotonic()
    fault_phase = duration_s * 2 / 3
    memory: Samples = {}

    def now() -> float:
        return time.monotonic() - start

    async def schedule_faults() -> None:
        gap = fault_phase / (len(FAULTS) + 1)
        for n, (name, what) in enumerate(FAULTS):
            await asyncio.sleep(max(0.0, (n + 1) * gap - now()))
            fault = Fault(name, what, now())
            faults.append(fault)
            action: Callable[[], Awaitable[None]] = getattr(injector, name)
            await action()
            fault.end_s = now()
        while now() < duration_s:  # the fault-free third: RSS every MEMORY_PERIOD_S
            await asyncio.sleep(max(0.0, fault_phase + 10 - now()))
            sample_memory(system, now(), memory)
            await asyncio.sleep(MEMORY_PERIOD_S)

    tasks = [asyncio.create_task(schedule_faults())]
    names, weights = [k.name for k in KINDS], [k.weight for k in KINDS]
    for i, offset in enumerate(poisson_offsets(rate, int(rate * duration_s * 2), seed)):
        if offset > duration_s:
            break
        await asyncio.sleep(max(0.0, offset - now()))
        kind = kinds[rng.choices(names, weights)[0]]
        results.append(Result(kind.name, now()))
        tasks.append(asyncio.create_task(send_one(traffic, kind, i, results[-1], now)))
    await asyncio.gather(*tasks)
    await channel.close()
    mark_recovery(faults, results)
    return {"results": results, "faults": faults, "duration_s": now(),
            "memory": memory_rows(memory), "rate": rate, "seed": seed,
            "steady_from_s": fault_phase + 10}


# ---- the report -----------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("out/RELIABILITY.md"))
    args = parser.parse_args()

    system = LocalSystem("tiny", args.models_dir, grpc_port=free_port(), num_cpus=2,
                         language_env={"HERO_LANGUAGE_LIMITS__MAX_NEW_TOKENS":
                                       str(LONG["max_new_tokens"]),
                                       "HERO_LANGUAGE_ALLOW_UNAUTHENTICATED": "true"},
                         vision_env={"HERO_VISION_API_TOKENS": TOKEN})
    system.start()
    try:
        run = asyncio.run(soak(system, args.duration, args.rate, args.seed))
    finally:
        system.stop()
    command = (".ci/isolated .venv/bin/python -m loadtest.soak "
               f"--duration {args.duration:g} --rate {args.rate:g} --out {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(run, command, machine()))
    lost = sum(1 for r in run["results"] if r.verdict == "lost")
    print(f"{len(run['results'])} requests, {lost} lost; report in {args.out}")
    raise SystemExit(1 if lost else 0)


if __name__ == "__main__":
    main()
