"""PNG plots of load runs: latency CDFs and latency against offered load."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from loadtest.stats import Outcome


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdf(runs: Mapping[str, Sequence[Outcome]], path: Path) -> Path:
    """TTFT and end-to-end latency CDFs, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, outcomes in runs.items():
        for ax, field in zip(axes, ("ttft_s", "e2e_s"), strict=True):
            values = sorted(getattr(o, field) * 1e3 for o in outcomes
                            if o.code == "OK" and getattr(o, field) is not None)
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    for ax, title in zip(axes, ("time to first token", "end to end"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_vs_load(series: Mapping[str, Sequence[tuple[float, float, float]]],
                    path: Path, target_ms: float | None = None) -> Path:
    """p50/p99 TTFT against achieved throughput: series name -> [(rps, p50, p99)]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in series.items():
        rps = [p[0] for p in points]
        (line,) = ax.plot(rps, [p[1] for p in points], marker="o", label=f"{name} p50")
        ax.plot(rps, [p[2] for p in points], marker="^", linestyle="--", label=f"{name} p99",
                color=line.get_color())
    if target_ms:
        ax.axhline(target_ms, color="grey", linewidth=1, label=f"p99 target {target_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("TTFT (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
