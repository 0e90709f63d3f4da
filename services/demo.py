"""`make demo`: prune a real public-domain photo with HERO and draw what it kept.

The photo is scikit-image's `astronaut.png` (NASA, public domain). With the offline
`tiny` model the weights are random, so the kept tokens show the mechanics (budget
split, thumbnail vs tiles), not a trained model's judgement; pass
`--model llava-v1.6-vicuna-7b --device cuda` on a GPU machine for the real thing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services import cli


def demo_photo() -> Path:
    """Path of scikit-image's astronaut photo (ships inside the package, no download)."""
    import skimage.data

    return Path(skimage.data.__file__).parent / "astronaut.png"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    photo = demo_photo()
    question = "What is the astronaut holding in her hands?"
    print(f"HERO Serve demo: pruning {photo.name} for the question {question!r}\n")
    if args.model == "tiny":
        print("(tiny model: random weights, so the choices show the mechanics only)\n")
    viz = args.out / "demo-hero.png"
    code = cli.main(["prune", str(photo), "--question", question, "--ratio", "0.111",
                     "--method", "hero", "--model", args.model, "--viz", str(viz)])
    if code == 0:
        print(f"\nOpen {viz} to see the kept tokens (bright) over the photo.")
    return code


if __name__ == "__main__":
    sys.exit(main())
