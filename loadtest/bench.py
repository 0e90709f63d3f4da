"""`make bench`: run every benchmark and rewrite docs/BENCHMARKS.md.

Each benchmark returns a markdown section; this script adds the machine, the
command and the date, so every number in the file can be traced to a run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from loadtest import aiperf_peer, scenarios
from loadtest.micro import (
    batching,
    hero_overhead,
    kv_cache,
    kv_report,
    prefill,
    prefix_share,
    relay,
    vision_cache,
    wire,
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, no GPU; Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, {torch.get_num_threads()} torch threads")


def overhead_section() -> str:
    return hero_overhead.report(hero_overhead.run_timing(), hero_overhead.run_memory())


def wire_section() -> str:
    return wire.report(wire.run())


def vision_cache_section() -> str:
    return vision_cache.report(vision_cache.run())


def prefill_section() -> str:
    return prefill.report(prefill.run())


def batching_section() -> str:
    return batching.report(batching.run(), Path("docs/bench-batching.png"))


def kv_cache_section() -> str:
    return kv_report.report(kv_cache.run())


def prefix_share_section() -> str:
    return prefix_share.report(prefix_share.run())


def relay_section() -> str:
    return relay.report(relay.run())


def load_section() -> str:
    return scenarios.report(scenarios.run_all(Path("out")))


def aiperf_section() -> str:
    return aiperf_peer.report(aiperf_peer.run_all(Path("out")))


SECTIONS: list[tuple[str, Callable[[], str]]] = [
    ("hero overhead", overhead_section),
    ("wire bytes and streaming", wire_section),
    ("vision stage, cache hit vs miss", vision_cache_section),
    ("llm prefill", prefill_section),
    ("language engines, batched vs one at a time", batching_section),
    ("language kv cache: prefix reuse, growth, admission", kv_cache_section),
    ("prefix shared by two questions", prefix_share_section),
    ("relay: whole system against the engine, coalescing off and on", relay_section),
    ("load against the baseline", load_section),
    ("aiperf over the openai api", aiperf_section),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    parser.add_argument("--only", action="append", help="run only sections named like this")
    args = parser.parse_args()
    parts = []
    for name, run in SECTIONS:
        if args.only and not any(o in name for o in args.only):
            continue
        start = time.perf_counter()
        print(f"bench: {name} ...", flush=True)
        parts.append(run())
        print(f"bench: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    today = datetime.date.today().isoformat()
    header = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`.ci/isolated .venv/bin/python -m loadtest.bench`) on "
        f"{today}. Machine: {machine()}.",
        "",
        "Ratios are measured side by side in one run; absolute times on a shared "
        f"{os.cpu_count()}-core",
        "machine are noisy. Re-run `make bench` to refresh every number here.",
        "",
    ]
    if args.only and args.out.exists():
        parts = merge_sections(args.out.read_text(), parts)
    args.out.write_text("\n".join(header + parts))
    print(f"bench: wrote {args.out}")


def merge_sections(old_doc: str, new_parts: list[str]) -> list[str]:
    """Old sections with the freshly run ones (same `## ` heading) replaced or added."""
    def title(part: str) -> str:
        return part.splitlines()[0]

    old = ["## " + chunk for chunk in old_doc.split("\n## ")[1:]]
    fresh = {title(p): p for p in new_parts}
    merged = [fresh.pop(title(p), p) for p in old]
    return merged + list(fresh.values())


if __name__ == "__main__":
    main()
