"""`make demo`: the whole system on this machine, asked about a real photo.

1. `hero prune` draws what HERO keeps of scikit-image's `astronaut.png` (NASA,
   public domain) into out/demo-hero.png.
2. `hero serve` starts a private Redis, the language service and the Ray Serve
   vision service in the background; the demo waits until they answer.
3. `hero ask` asks two different questions about the photo: the first encodes it
   (cache miss), the second is served from the Redis entry (cache hit).
4. Everything is stopped; the demo ends with where to find the playground page (a
   browser page at the root of `hero serve`'s HTTP port: ask, and see what HERO kept).

With the offline `tiny` model the weights are random, so the answers are
meaningless words; the stats are real. See the README for running a real
checkpoint on a GPU.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from services import cli
from services.local import free_port

HTTP_URL = "http://127.0.0.1:8000/v1"
"""Where `hero serve` puts the OpenAI-compatible API by default."""
QUESTIONS = ("What is the astronaut holding in her hands?",
             "What flag is in the top left corner?")
REAL_MODEL_HINT = """\
The tiny model has random weights, so the words above mean nothing; the token
counts, cache hit and timings are real. On a GPU machine with the hub reachable:
  hero serve --model llava-v1.6-vicuna-7b --device cuda --dtype float16
  hero ask photo.jpg "What is on the sign?"
"""


def demo_photo() -> Path:
    """Path of scikit-image's astronaut photo (ships inside the package, no download)."""
    import skimage.data

    return Path(skimage.data.__file__).parent / "astronaut.png"


def start_system(model: str, port: int, timeout_s: float = 600) -> subprocess.Popen[str]:
    """`hero serve` in the background; returns once it prints that it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--model", model,
                             "--grpc-port", str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        print(f"  serve | {line.rstrip()}", flush=True)
        if "HERO Serve ready" in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("hero serve did not become ready")


def stop_system(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
        for line in (out or "").splitlines():
            print(f"  serve | {line}")
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    photo = demo_photo()
    print(f"== 1. What HERO keeps of {photo.name} at retention 0.111\n", flush=True)
    viz = args.out / "demo-hero.png"
    code = cli.main(["prune", str(photo), "--question", QUESTIONS[0], "--ratio", "0.111",
                     "--model", args.model, "--viz", str(viz)])
    if code:
        return code
    print("\n== 2. Starting the system (hero serve)\n", flush=True)
    port = free_port()
    proc = start_system(args.model, port)
    try:
        for i, question in enumerate(QUESTIONS, start=1):
            label = "cache miss: encodes" if i == 1 else "cache hit: same photo"
            print(f"\n== 3.{i} hero ask {photo.name} {question!r}  ({label})\n", flush=True)
            code = cli.main(["ask", str(photo), question, "--target", f"127.0.0.1:{port}",
                             "--max-new-tokens", "24"])
            if code:
                return code
    finally:
        print("\n== 4. Stopping\n", flush=True)
        stop_system(proc)
    print(f"\n{REAL_MODEL_HINT}\nKept-token picture: {viz}")
    print(f"Playground page: run `hero serve` and open {cli.playground_url(HTTP_URL)} to ask "
          "in a browser and see the kept tokens of each tile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
