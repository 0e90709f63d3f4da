"""The soak's report (docs/RELIABILITY.md), written from a run's results.

Every number comes from the run or from the code and configuration it ran with (the
Serve config, the services' settings); the fixed sections state what the token path
does under failure and where each behaviour is tested.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import yaml

from loadtest.soak_plan import GRACE_S, KINDS, LONG, MEMORY_PERIOD_S, Fault, Result
from loadtest.stats import percentile
from services.vision.config import CacheConfig

MIN_RECOVERY_S = 15.0
"""A fault's window lasts at least this long after its end."""
LOCK_TTL_S = CacheConfig().lock_ttl_s
"""The cross-replica encode lock's lifetime (the soak runs the default)."""


def in_window(result: Result, fault: Fault) -> bool:
    """Whether the request was in flight while the fault lasted or the system recovered
    from it: until the first answer after the fault's end, and at least MIN_RECOVERY_S."""
    recovered = (float("inf") if fault.recovered_s is None
                 else max(MIN_RECOVERY_S, fault.recovered_s))
    ended = result.sent_s + result.latency_s
    return result.sent_s <= fault.end_s + recovered and ended >= fault.start_s


def codes(results: list[Result]) -> str:
    counts = collections.Counter(r.code for r in results)
    return ", ".join(f"{code} {n}" for code, n in counts.most_common()) or "-"


def report(run: dict[str, Any], command: str, machine: str) -> str:
    results: list[Result] = run["results"]
    lines = [*summary(run, command, machine), *traffic(results), *faults(run),
             *memory(run), "## The token path under failure", "", *TOKEN_PATH, "",
             "## Where each behaviour is tested", "",
             "| behaviour | test (in `make test`) |", "|---|---|",
             *(f"| {what} | {where} |" for what, where in TESTED), ""]
    return "\n".join(lines)


def summary(run: dict[str, Any], command: str, machine: str) -> list[str]:
    results: list[Result] = run["results"]
    verdicts = collections.Counter(r.verdict for r in results)
    during_faults = sum(1 for r in results if r.verdict == "degraded"
                        and any(in_window(r, f) for f in run["faults"]))
    calm = [r for r in results if r.kind in ("hit", "miss")
            and not any(in_window(r, f) for f in run["faults"])]
    calm_ok = sum(1 for r in calm if r.code == "OK")
    return [
        "# Reliability", "",
        "What the system does when clients misbehave, dependencies fail and load piles up, "
        "measured by a soak run (`loadtest/soak.py`) against the whole local system: a real "
        "Redis, the language service process and the Ray Serve vision app (tiny model, CPU).",
        "",
        f"* command: `{command}`",
        f"* machine: {machine}",
        f"* {run['duration_s']:.0f} s, open-loop Poisson arrivals at {run['rate']:g} req/s "
        f"(seed {run['seed']}); faults in the first two thirds, none in the last third.",
        "",
        f"**{len(results)} requests: {verdicts['expected']} got the outcome they deserve, "
        f"{verdicts['degraded']} a clear retryable error (UNAVAILABLE / RESOURCE_EXHAUSTED; "
        f"{during_faults} of them in flight during a fault or the recovery from it), "
        f"{verdicts['other']} another status, {verdicts['lost']} lost** (no final status "
        f"within their deadline + {GRACE_S:.0f} s).",
        "",
        f"**Outside fault windows, {calm_ok} of {len(calm)} valid hit and miss requests "
        f"({calm_ok / max(1, len(calm)):.1%}) ended OK** (the rest: "
        f"{codes([r for r in calm if r.code != 'OK'])}).",
        "",
        *refusal_lines([r for r in calm if r.code != "OK"]),
        f"Outside fault windows, RESOURCE_EXHAUSTED is admission at work: {language_limits()}; "
        f"the long `cancel` and `deadline` answers reserve KV for "
        f"{LONG['max_new_tokens']:,} tokens each. {encoder_limits()} Past a queue the request "
        "is refused on arrival there; its end-to-end time below includes what it spent "
        "before (an encode, on a miss).",
        "",
    ]


def traffic(results: list[Result]) -> list[str]:
    by_kind = collections.defaultdict(list)
    for r in results:
        by_kind[r.kind].append(r)
    lines = ["## Traffic and bad inputs", "",
             "| kind | what | expected | sent | outcomes | p50 / p99 s |",
             "|---|---|---|---:|---|---|"]
    for kind in KINDS:
        rs = by_kind.get(kind.name, [])
        lat = [r.latency_s for r in rs]
        p = (f"{percentile(lat, 50):.2f} / {percentile(lat, 99):.2f}" if lat else "-")
        lines.append(f"| {kind.name} | {kind.what} | {kind.expected} | {len(rs)} | "
                     f"{codes(rs)} | {p} |")
    unexpected = [r for r in results if r.verdict in ("other", "lost")]
    if unexpected:
        lines += ["", "Requests with another status, each:", ""]
        lines += [f"* {r.kind} at {r.sent_s:.0f} s: {r.code}: {r.details or '-'}"
                  for r in unexpected]
    refused = [r.latency_s for r in results if r.code == "RESOURCE_EXHAUSTED"]
    if refused:
        lines += ["", f"RESOURCE_EXHAUSTED answers: {len(refused)}, p50 "
                  f"{percentile(refused, 50):.3f} s, p99 {percentile(refused, 99):.3f} s."]
    return [*lines, ""]


def faults(run: dict[str, Any]) -> list[str]:
    lines = ["## Faults injected", "",
             "Requests counted against a fault were in flight at some point between its start "
             f"and the system's recovery from it (at least {MIN_RECOVERY_S:g} s after its end). "
             "Recovery: from the fault's end to the first answer of a request sent after it.",
             "", "| fault | at s | lasted s | requests | outcomes | recovered after s |",
             "|---|---:|---:|---:|---|---:|"]
    for f in run["faults"]:
        rs = [r for r in run["results"] if in_window(r, f) and kinds_valid(r)]
        rec = f"{f.recovered_s:.1f}" if f.recovered_s is not None else "never"
        lines.append(f"| {f.what} | {f.start_s:.0f} | {f.end_s - f.start_s:.1f} | {len(rs)} | "
                     f"{codes(rs)} | {rec} |")
    return [*lines, "", "(valid requests only: hit, miss, prune.)", ""]


def memory(run: dict[str, Any]) -> list[str]:
    lines = ["## Memory in the fault-free third", "",
             f"RSS of each long-lived process every {MEMORY_PERIOD_S:g} s from "
             f"{run['steady_from_s']:.0f} s to the end (the process alive at the end; a "
             "replica a fault replaced starts its own series). Growth over the whole series "
             "and over its second half.", "",
             "| process | RSS MB over time | growth | second half |", "|---|---|---:|---:|"]
    for m in run["memory"]:
        series = " → ".join(f"{mb:.0f}" for _, mb in m["series"])
        lines.append(f"| {m['role']} | {series} | {m['growth_pct']:+.1f} % | "
                     f"{m['late_growth_pct']:+.1f} % |")
    return [*lines, "", "Redis grows while new images fill the cache; `maxmemory` with LRU "
            "eviction bounds it.", ""]


def shutdown_line() -> str:
    """What SIGTERM does, with the drains the code and the Serve config set."""
    from services.language.config import LanguageConfig
    from services.vision.drain import ingress_grace_s
    from services.vision.runner import SERVE_CONFIG

    language = LanguageConfig.model_fields["shutdown_grace_s"].default
    vision = ingress_grace_s(yaml.safe_load(SERVE_CONFIG.read_text()))
    return ("* **Shutdown drains instead of cutting answers.** On SIGTERM the language "
            "service reports NOT_SERVING and refuses new calls with UNAVAILABLE while its "
            f"running answers finish (`shutdown_grace_s`, {language:g} s: the vision "
            "service's longest language call); the vision service's single-node runner "
            "does the same for the app (the VisionIngress deployment's "
            f"`graceful_shutdown_timeout_s`, {vision:g} s) before it stops Serve, and on "
            "Kubernetes a stopping Ray pod drains its node at least as long. What outlives "
            "the grace ends with UNAVAILABLE (retryable), never CANCELLED or a cut stream.")


TOKEN_PATH = [
    "* **One encoding per image, with no shared failure.** Concurrent misses share one "
    "encoding; what belongs to one request alone (fetching its image by id, checking its "
    "prompt with the language service) runs before it encodes, so a request that sent the "
    "bytes never inherits another's NOT_FOUND or INVALID_ARGUMENT. The encoding runs in a "
    "task of its own, outside the Serve request that started it (Ray cancels a request's "
    "calls to other deployments with it): a request that is cancelled or reaches its "
    "deadline stops waiting, the encoding completes for the others and lands in the cache.",
    f"* **A dead replica stalls an image for at most `cache.lock_ttl_s` ({LOCK_TTL_S:g} s).** "
    "The cross-replica lock holds a random token, is renewed every third of its lifetime "
    "while the owner encodes, and is released only by its owner; a waiter gives up at its "
    "own deadline with DEADLINE_EXCEEDED.",
    "* **Redis down:** tokens are a miss (encoded again), an `image_id` request is "
    "UNAVAILABLE (retryable: the image is not lost, only unreachable).",
    "* **A stored value serves a correct answer or is rebuilt.** Every shipped "
    "configuration signs cache values (HMAC-SHA256 with `cache.secret`: `hero serve` makes "
    "one per run, Compose and Kubernetes require one, and the service refuses to start "
    "against Redis without one unless `cache.allow_unsigned`), so a Redis writer cannot "
    "forge or move an entry. A value is also checked, when it is read, against what the "
    "encoder makes (an image size within the pixel limit, one ranking per crop of "
    "the method's length, features and state of the encoder's widths and dtypes, all "
    "finite; record headers bounded in size and nesting before they are parsed). Any "
    "failure decoding or using it, whatever the exception, counts it `corrupt`: it is "
    "deleted and rebuilt from the request's image bytes, or the stored image of an "
    "`image_id` (an id alone whose image is gone gets NOT_FOUND: send the image again).",
    "* **Deadlines:** a language call is never retried once the client's deadline cannot "
    "fit the backoff, and a call that ends past the deadline is DEADLINE_EXCEEDED, "
    "whatever grpc reported (a stream cut mid-upload shows as INTERNAL; a language call "
    "grpc.aio cancels itself when its deadline passes as its request stream closes shows "
    "as a CancelledError), never CANCELLED.",
    "* **Cancels:** a client's cancel reaches the ingress and its language call through "
    "Serve's proxy wherever the proxy is when it lands (`services.vision.api.relay`), so "
    "the language service frees the sequence within a second.",
    "* **Health:** `grpc.health.v1.Health/Check` on the public port is NOT_SERVING while "
    "the language service does not answer (checked at most once a second).",
    "* **One request's numbers end only its own answer.** Every accepted temperature "
    "(down to 1.4e-45), top_p and seed samples a token; visual features holding NaN or "
    "infinity are INVALID_ARGUMENT before they reach the engine. A sequence whose logits "
    "still go NaN or infinite (finite but huge features) ends alone with INVALID_ARGUMENT; "
    "one whose sampling, text or decode forward fails ends alone with INTERNAL. The "
    "batch's other sequences, and later ones on its KV slots, go on unaffected: their "
    "logits differ from their alone run's by fp32 rounding only, as beside any request.",
    shutdown_line(),
]
"""How the token path behaves under failure (fixed text of the report)."""

TESTED = [
    ("bad inputs get INVALID_ARGUMENT / NOT_FOUND / UNAUTHENTICATED with a message",
     "tests/integration/test_system.py, tests/service/test_language.py"),
    ("malformed request bytes get INVALID_ARGUMENT; error details carry no object reprs or "
     "addresses; an upload above the limit is refused by Serve's proxy as it arrives",
     "tests/integration/test_system.py, tests/service/test_vision_endpoint.py"),
    ("a prompt or max_new_tokens the language service would refuse is refused before the "
     "image is encoded", "tests/service/test_vision_endpoint.py"),
    ("a passed deadline is DEADLINE_EXCEEDED and never followed by a retry",
     "tests/service/test_vision_endpoint.py"),
    ("grpc.health.v1 on the public port: NOT_SERVING while the language service is down",
     "tests/integration/test_system_faults.py, tests/service/test_vision_endpoint.py"),
    ("fuzzed image, tensor codec and cache-entry decoding raise only typed errors",
     "tests/unit/test_fuzz.py, test_codec.py, test_cache_entry.py"),
    ("Redis killed and restarted, stalled, password-protected; with Redis down an "
     "image_id is UNAVAILABLE and bytes are still served",
     "tests/integration/test_system.py, tests/service/test_cache_redis.py, "
     "test_vision_tokens.py"),
    ("a request with the image bytes never inherits an image_id request's NOT_FOUND; "
     "bytes that are not an image are not stored", "tests/service/test_vision_tokens.py"),
    (f"a replica killed mid-encode stalls that image at most the lock's {LOCK_TTL_S:g} s; "
     "the lock is renewed while encoding and released only by its owner; waiters give up at their "
     "deadline", "tests/service/test_cache_redis.py"),
    ("language service killed mid-stream: UNAVAILABLE in < 10 s, retries, recovery",
     "tests/integration/test_system_faults.py"),
    ("encoder replica killed: clear codes, Serve replaces it",
     "tests/integration/test_system_faults.py"),
    ("client cancel and deadline stop the generation in the language service; every one "
     "of 12 client cancels frees its sequence within a second; a cancelled first request "
     "does not fail those waiting for its encoding",
     "tests/integration/test_system_overload.py, test_system_door.py, "
     "tests/service/test_cancel_paths.py"),
    ("hero-timeout-ms 0..20 (200 calls, with and without a gRPC deadline) is always "
     "DEADLINE_EXCEEDED, never CANCELLED", "tests/integration/test_system_door.py, "
     "tests/service/test_cancel_paths.py, test_vision_door.py"),
    ("metadata is read after the token: any hero-timeout-ms value that is not one (huge, "
     "overflowing, negative, NaN, non-ASCII, repeated) is INVALID_ARGUMENT saying what to "
     "send; every request field is bounded, naming the field and the limit; anything "
     "unexpected is INTERNAL with only the request id",
     "tests/service/test_vision_door.py, tests/integration/test_system_door.py"),
    ("a request within every limit never meets a transport limit (the language service's "
     "receive limit, the proxy's request bound)", "tests/service/test_wire_limits.py"),
    ("past the language queue: RESOURCE_EXHAUSTED at once",
     "tests/integration/test_system_overload.py, tests/service/test_language.py"),
    ("one sequence cancelled, past its deadline or failing leaves the batch's others "
     "unchanged; a request larger than the KV cache is refused naming it",
     "tests/unit/test_batched_engine.py"),
    ("a greedy sequence beside any sampling parameters, NaN, infinite or huge features, or "
     "a row whose logits, sampler, text or forward fail mid-answer (a property), and later "
     "sequences on that row's KV slots, produce exactly their alone tokens; the other row "
     "completes or ends alone; tiny temperatures beside greedy calls end no call",
     "tests/unit/test_isolation.py, test_sampling.py, "
     "tests/service/test_language_isolation.py"),
    ("SIGTERM drains: answers running finish, new calls get UNAVAILABLE and health "
     "NOT_SERVING, answers past the grace end UNAVAILABLE; pods' termination grace covers "
     "preStop and drain",
     "tests/service/test_language_shutdown.py, test_vision_shutdown.py, "
     "tests/integration/test_system_sigterm.py, test_system_shutdown.py, "
     "tests/unit/test_deploy_shutdown.py"),
    ("corrupt, mismatched or forged cache entries (another key, another image, no valid "
     "MAC when a secret is set, a layout out of range) and stored images that do not hash "
     "to their id are dropped and re-encoded, never served",
     "tests/unit/test_cache_entry.py, tests/service/test_cache_redis.py, "
     "test_vision_tokens.py"),
    ("fuzzed poisoned records that pass the envelope and CRC checks (headers "
     "nested, oversized or of the wrong types; bad image sizes and grids; tensors of half "
     "width, extra rows, another dtype, NaN; a selection keeping nothing) are dropped and "
     "rebuilt, and every request "
     "gets the tokens of an uncached one",
     "tests/service/test_cache_poison.py, tests/unit/test_serialization.py, "
     "test_cache_entry.py"),
    ("the vision service refuses to start against Redis without a cache secret unless "
     "allowed; every shipped deployment requires one",
     "tests/unit/test_config.py, test_deploy_compose.py"),
]
"""What the soak exercises statistically, and where each behaviour is tested exactly."""


def refusal_lines(failed: list[Result]) -> list[str]:
    """What stopped the valid requests that failed outside fault windows, by message."""
    if not failed:
        return []
    groups = collections.defaultdict(list)
    for r in failed:
        groups[(r.code, re.sub(r"\d+(\.\d+)?", "N", r.details))].append(r)
    lines = ["Those requests, by status and message (numbers as N):", ""]
    for (code, message), rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        at = ", ".join(f"{r.sent_s:.0f}" for r in rs[:12]) + (" ..." if len(rs) > 12 else "")
        lines.append(f"* {len(rs)} x {code}: {message or '-'} (sent at s: {at})")
    return [*lines, ""]


def language_limits() -> str:
    """What the soak's language service admits: its defaults, read from its config."""
    from services.language.config import LanguageConfig

    c = LanguageConfig()
    return (f"the language service ({c.engine} engine, its defaults) decodes up to "
            f"{c.batching.max_batch_size} sequences at once in a KV cache of "
            f"{c.batching.kv_cache_tokens:,} tokens, and {c.max_queue} more may wait")


def encoder_limits() -> str:
    """How many encodes the Serve config lets the encoder deployment run and queue."""
    from services.vision.runner import SERVE_CONFIG

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    (encoder,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Encoder"]
    return (f"The encoder deployment runs {encoder['max_ongoing_requests']} encodes per replica "
            f"and queues {encoder['max_queued_requests']}.")


def kinds_valid(result: Result) -> bool:
    return result.kind in ("hit", "miss", "prune")
