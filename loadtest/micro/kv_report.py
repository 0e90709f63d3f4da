"""The markdown section of the KV cache benchmark (`kv_cache.py`); run this module to
run the benchmark and print the section."""

from __future__ import annotations

import statistics
from typing import Any

from loadtest.micro.kv_cache import (
    ASKED,
    LARGE,
    LARGE_AT_S,
    RESERVATIONS,
    RETENTION,
    SMALL,
    STREAM,
    STREAM_GAP_S,
    TTFT_REPEATS,
    run,
)


def follow_up_lines(r: dict[str, Any]) -> list[str]:
    f = r["follow"]
    (on1, off1), (on8, off8) = (f["alone"][True], f["alone"][False]), (f["eight"][True],
                                                                        f["eight"][False])
    return [
        "### A follow-up question about the same image",
        "",
        "Each conversation asks a first question about its image, then a follow-up about "
        "the same image (the same kept tokens); the follow-up's TTFT is measured with "
        "prefix reuse on and off (off: nothing of the first question is kept). Follow-ups "
        "arrive at once; 1 conversation: median of "
        f"{TTFT_REPEATS}, on and off taking turns.",
        "",
        "| conversations | TTFT without reuse s | TTFT with reuse s | lower by |",
        "|---:|---:|---:|---:|",
        f"| 1 | {off1:.2f} | {on1:.2f} | **{off1 / on1:.1f}x** |",
        f"| 8 (p50) | {off8[0]:.2f} | {on8[0]:.2f} | {off8[0] / on8[0]:.1f}x |",
        f"| 8 (slowest) | {off8[1]:.2f} | {on8[1]:.2f} | {off8[1] / on8[1]:.1f}x |",
        "",
        f"The follow-up's prompt is {f['tokens']} tokens; {f['hits']} of them (the text "
        "before the image and every visual token, in whole blocks) come from the prefix "
        "cache, so only the question is prefilled (target: >= 4x lower TTFT at 1).",
    ]


def growth_lines(r: dict[str, Any]) -> list[str]:
    reserve, grow = r["growth"]
    lengths = reserve["lengths"]
    lines = [
        "### Growing KV allocation against up-front reservation",
        "",
        f"One KV budget, {r['kv_tokens']:,} tokens: what {RESERVATIONS} requests reserve "
        f"up front ({r['reserve']} tokens each: prompt + max_new_tokens {ASKED}, in whole "
        f"blocks). {len(lengths)} requests about different images arrive at once, each asking "
        f"for {ASKED} tokens; their answers end at varied lengths (log-normal quantiles, "
        f"median {statistics.median(lengths):.0f}, longest {max(lengths)}: "
        f"{', '.join(map(str, lengths))}; the benchmark ends each answer there, since "
        "random weights never stop by themselves). Running sequences are sampled every "
        "50 ms over the whole run (prefills included).",
        "",
        "| allocation | sequences running (time mean) | most | sequences per decode step | "
        "decode tok/s | end-to-end tok/s | wall s | queue p50 s | preemptions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in (reserve, grow):
        lines.append(f"| {g['allocation']} | {g['running']:.1f} | {g['peak']} | "
                     f"{g['batch']:.1f} | {g['decode_tps']:.1f} | {g['end_to_end_tps']:.1f} | "
                     f"{g['wall_s']:.0f} | {g['queue_p50_s']:.1f} | {g['preemptions']} |")
    more = grow["running"] / reserve["running"]
    return [*lines, "", f"Growing allocation runs **{more:.1f}x** the sequences at once "
            f"(target >= 1.5x; {grow['peak'] / reserve['peak']:.1f}x at the most), "
            f"{grow['decode_tps'] / reserve['decode_tps']:.2f}x the decode tokens/s and "
            f"{grow['end_to_end_tps'] / reserve['end_to_end_tps']:.2f}x end to end, "
            f"with {grow['preemptions']} preemption(s) (each recomputes a sequence, mostly "
            "from its own blocks still in the prefix cache)."]


def stream_lines(r: dict[str, Any]) -> list[str]:
    small, large = r["sizes"]
    lines = [
        "### A large request behind a stream of small ones",
        "",
        f"KV budget {r['stream_kv']:,} tokens. Four small requests (retention {SMALL:g}, "
        f"{small} tokens with their answers) run; a large one (retention {LARGE:g}, "
        f"{large} tokens) arrives at {LARGE_AT_S} s and does not fit beside them; then "
        f"{STREAM} more small ones arrive, one every {STREAM_GAP_S} s. **Bound**: when the "
        "sequences running at the last admission past the large request (or at its "
        "arrival) had all ended, measured from its arrival.",
        "",
        "| max_bypass | large request's wait s | its bound s | admitted past it | "
        "stream's wait mean s | slowest s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["stream"]:
        lines.append(f"| {s['max_bypass']} | {s['large_wait_s']:.1f} | {s['bound_s']:.1f} | "
                     f"{s['passed']} | {s['stream_mean_s']:.1f} | {s['stream_max_s']:.1f} |")
    return [*lines, "", "First come, first served (0) makes every small request wait behind "
            "the large one. With bypass, small requests that fit go first, but at most "
            "`max_bypass` of them: then the large one is next and nothing more is admitted "
            "past it, so it is admitted by the time the sequences running then have ended "
            "(each within its max_new_tokens decode steps): its wait is at most its bound."]


def gather_lines(r: dict[str, Any]) -> list[str]:
    gather, step = r["gather"]
    return [
        "### The KV read of a decode step",
        "",
        f"At batch 8 with {r['prompt'] + 24} tokens of context per row, gathering every "
        f"layer's keys and values from the pool's blocks takes {gather * 1e3:.1f} ms, "
        f"{gather / step:.0%} of the {step * 1e3:.0f} ms batched decode forward. The copy "
        "stays: transformers' attention (SDPA here) takes each row's keys and values as one "
        "tensor, so rows in scattered blocks are gathered; one row whose blocks are "
        "consecutive is read in place (a view, no copy). On a GPU the same gather runs on "
        "the device (an index_select per layer, no host synchronisation), at the device's "
        "memory bandwidth; the `vllm` engine reads its paged cache in place.",
    ]


def report(r: dict[str, Any]) -> str:
    lines = [
        "## Language service: KV blocks, prefix reuse and admission",
        "",
        "The batched engine's KV cache in blocks of 16 tokens, on the model and requests of "
        f"the section above (0.25 B Llama, random weights, fp32, CPU; one 2x2-grid image at "
        f"retention {RETENTION:g}: a {r['prompt']}-token prompt).",
        "",
        *follow_up_lines(r), "", *growth_lines(r), "", *stream_lines(r), "",
        *gather_lines(r),
    ]
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    print(report(run()))
