"""The task: 2x2 mosaics of easy-VQA images and questions about one cell or the whole.

easy-VQA (pip package `easy-vqa`, data only) has 64x64 images of one coloured shape
on a pale background, each with a few questions. A mosaic puts four cells side by
side; a cell is `cell_px` square, filled with the image's background colour, with the
image pasted at `image_px` at a random place, or left blank. With the defaults the
mosaic is 448x448, the AnyRes tiling picks a 2x2 grid whose tiles are exactly the
cells, and the thumbnail shows each 64-pixel image at 32 pixels: small shapes need
the tiles' detail.

Questions: a cell question is one of that cell's own easy-VQA questions, prefixed by
the cell's position ("top-left cell: what color is the shape?"), answered as easy-VQA
answers it; a mosaic question asks whether a shape occurs ("is there a circle?") or
how many there are ("how many triangles are there?"); a named question asks about the
one cell that holds a named shape ("what color is the circle?", "is there a red
circle?", "how many red circles are there?"), so a method that routes budget to that
cell can gain where one that spreads it evenly cannot.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from hero_core.config import require

SHAPES = ("circle", "rectangle", "triangle")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
"""Cell names in raster order; cell i is tile i+1 of the 2x2 grid."""
COUNTS = ("0", "1", "2", "3", "4")
YES_NO = ("yes", "no")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
"""easy-VQA's eight shape colours."""
NAMED_KINDS = ("named-color", "named-exists", "named-count")
"""Questions about the one cell that holds a named shape."""


@dataclasses.dataclass(frozen=True)
class EasyVqaImage:
    """One easy-VQA image with its shape, colour and own questions."""

    image_id: int
    path: Path
    shape: str
    color: str
    questions: tuple[tuple[str, str], ...]
    """(question, answer) pairs exactly as easy-VQA ships them."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One quarter of a mosaic: an easy-VQA image at `offset`, or blank (`image` None)."""

    image: EasyVqaImage | None
    background: tuple[int, int, int]
    offset: tuple[int, int]
    """(top, left) of the pasted image inside the cell, in pixels."""


@dataclasses.dataclass(frozen=True)
class Question:
    """A question about one mosaic and its answer."""

    text: str
    answer: str
    kind: str
    """`cell-open`, `cell-yesno`, `exists`, `count` or one of `NAMED_KINDS`."""
    cell: int | None
    """The cell (0..3, raster order) a cell question is about; None for other questions."""
    target: int | None = None
    """The cell that holds the answer, when one does: the cell a cell question is about, or
    the one cell holding the shape a named question names."""


@dataclasses.dataclass(frozen=True)
class Mosaic:
    """Four cells (raster order) and the questions asked about them."""

    cells: tuple[Cell, ...]
    questions: tuple[Question, ...]


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """How mosaics are drawn; every field changes the pixels or the questions."""

    cell_px: int = 224
    """Side of a cell; 224 makes each cell exactly one 224-px DINOv2 tile."""
    image_px: int = 64
    """Side at which the 64x64 easy-VQA image is pasted into its cell."""
    blank_prob: float = 0.25
    """Chance that a cell holds no shape, so tiles differ in importance."""
    blank_variants: int = 16
    """Distinct blank cells per split (background colours of the split's images)."""
    yes_no_per_cell: int = 3
    """Yes/no questions asked per cell (all of its open questions are asked)."""

    def __post_init__(self) -> None:
        require(0 < self.image_px <= self.cell_px, "image_px must be in (0, cell_px]")
        require(0.0 <= self.blank_prob < 1.0, "blank_prob must be in [0, 1)")
        require(self.blank_variants > 0, "blank_variants must be > 0")
        require(self.yes_no_per_cell >= 0, "yes_no_per_cell must be >= 0")


def easy_vqa_dir() -> Path:
    """The installed easy-vqa package's `data` folder (found without importing it)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("easy-vqa is not installed; `make setup` installs easy-vqa==1.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def answer_vocabulary() -> tuple[str, ...]:
    """easy-VQA's 13 answers (its answers.txt) followed by the counts 0..4."""
    answers = (easy_vqa_dir() / "answers.txt").read_text().split()
    return (*answers, *COUNTS)


def describe(questions: list[tuple[str, str]]) -> tuple[str, str] | None:
    """(shape, colour) of an image from the answers of its open questions, or None."""
    shapes = {a for _, a in questions if a in SHAPES}
    colors = {a for _, a in questions if a not in SHAPES and a not in YES_NO}
    if len(shapes) != 1 or len(colors) != 1:
        return None
    return shapes.pop(), colors.pop()


@cache
def load_split(split: str) -> tuple[EasyVqaImage, ...]:
    """The images of easy-VQA's `train` or `test` split whose shape and colour are known
    from their own open questions (2,435 of 4,000 train and 603 of 1,000 test images)."""
    root = easy_vqa_dir() / split
    grouped: dict[int, list[tuple[str, str]]] = {}
    for text, answer, image_id in json.loads((root / "questions.json").read_text()):
        grouped.setdefault(int(image_id), []).append((str(text), str(answer)))
    images = []
    for image_id in sorted(grouped):
        described = describe(grouped[image_id])
        if described is not None:
            images.append(EasyVqaImage(image_id, root / "images" / f"{image_id}.png",
                                       *described, tuple(grouped[image_id])))
    return tuple(images)


@cache
def image_pixels(path: Path) -> np.ndarray:
    """RGB uint8 `(64, 64, 3)` pixels of an easy-VQA image."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def background_color(pixels: np.ndarray) -> tuple[int, int, int]:
    """The most frequent colour of an image `(H, W, 3)`: its background."""
    colors, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    r, g, b = (int(v) for v in colors[int(counts.argmax())])
    return r, g, b


def render_cell(cell: Cell, config: MosaicConfig) -> np.ndarray:
    """Pixels `(cell_px, cell_px, 3)` uint8 of one cell."""
    out = np.empty((config.cell_px, config.cell_px, 3), np.uint8)
    out[:] = cell.background
    if cell.image is not None:
        image = Image.fromarray(image_pixels(cell.image.path))
        if config.image_px != image.width:
            image = image.resize((config.image_px, config.image_px), Image.Resampling.BICUBIC)
        top, left = cell.offset
        out[top:top + config.image_px, left:left + config.image_px] = np.asarray(image)
    return out


def render_mosaic(mosaic: Mosaic, config: MosaicConfig) -> Image.Image:
    """The mosaic as an RGB image of `2 * cell_px` square."""
    rows = [np.concatenate([render_cell(c, config) for c in mosaic.cells[r:r + 2]], axis=1)
            for r in (0, 2)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def object_mask(pixels: np.ndarray, background: tuple[int, int, int],
                tolerance: int = 24) -> np.ndarray:
    """Which pixels `(H, W)` differ from the background colour: the shape."""
    diff = np.abs(pixels.astype(np.int16) - np.asarray(background, np.int16)).max(-1)
    return np.asarray(diff > tolerance)


def cell_questions(cell: Cell, index: int, max_yes_no: int,
                   rng: random.Random) -> list[Question]:
    """Every open question of the cell's own easy-VQA questions and up to `max_yes_no` of its
    yes/no questions, prefixed by the cell's position."""
    if cell.image is None:
        return []
    prefix = f"{POSITIONS[index]} cell: "
    open_ = [(q, a) for q, a in cell.image.questions if a not in YES_NO]
    yes_no = [(q, a) for q, a in cell.image.questions if a in YES_NO]
    chosen = [(q, a, "cell-open") for q, a in open_]
    chosen += [(q, a, "cell-yesno") for q, a in rng.sample(yes_no, min(max_yes_no, len(yes_no)))]
    return [Question(prefix + q, a, kind, index, index) for q, a, kind in chosen]


def mosaic_questions(cells: tuple[Cell, ...]) -> list[Question]:
    """For every shape: whether it occurs anywhere, and how many times."""
    shapes = Counter(c.image.shape for c in cells if c.image is not None)
    out = []
    for shape in SHAPES:
        out.append(Question(f"is there a {shape}?", "yes" if shapes[shape] else "no",
                            "exists", None))
        out.append(Question(f"how many {shape}s are there?", str(shapes[shape]), "count", None))
    return out


def named_questions(cells: tuple[Cell, ...], rng: random.Random) -> list[Question]:
    """For every shape held by exactly one cell: its colour, and whether (and how many times)
    a coloured shape of that kind occurs, the colour true or another one with even odds."""
    out = []
    for shape in SHAPES:
        holders = [i for i, c in enumerate(cells) if c.image is not None and c.image.shape == shape]
        if len(holders) != 1:
            continue
        cell = holders[0]
        color = cells[cell].image.color  # type: ignore[union-attr]
        out.append(Question(f"what color is the {shape}?", color, "named-color", None, cell))
        for kind, template, answers in (("named-exists", "is there a {} {}?", ("yes", "no")),
                                        ("named-count", "how many {} {}s are there?", ("1", "0"))):
            asked = color if rng.random() < 0.5 else rng.choice([c for c in COLORS if c != color])
            answer = answers[0] if asked == color else answers[1]
            out.append(Question(template.format(asked, shape), answer, kind, None, cell))
    return out


def make_cells(images: tuple[EasyVqaImage, ...], config: MosaicConfig,
               rng: random.Random) -> list[Cell]:
    """One cell per image, each at a random offset on its own background."""
    span = config.cell_px - config.image_px
    return [Cell(image, background_color(image_pixels(image.path)),
                 (rng.randint(0, span), rng.randint(0, span))) for image in images]


def make_blanks(images: tuple[EasyVqaImage, ...], config: MosaicConfig,
                rng: random.Random) -> list[Cell]:
    """Blank cells in the background colours of randomly chosen images."""
    chosen = rng.sample(list(images), min(config.blank_variants, len(images)))
    return [Cell(None, background_color(image_pixels(i.path)), (0, 0)) for i in chosen]


def make_mosaics(cells: list[Cell], blanks: list[Cell], count: int, config: MosaicConfig,
                 layout_rng: random.Random, question_rng: random.Random) -> list[Mosaic]:
    """`count` mosaics: each slot blank with `blank_prob`, else a cell not yet in the mosaic.

    Cells repeat across mosaics (with other neighbours and questions), so their tiles
    are encoded once; every mosaic's thumbnail is new.
    """
    mosaics = []
    for _ in range(count):
        picked = iter(layout_rng.sample(cells, 4))
        slots = tuple(layout_rng.choice(blanks) if layout_rng.random() < config.blank_prob
                      else next(picked) for _ in range(4))
        questions = [q for i, c in enumerate(slots)
                     for q in cell_questions(c, i, config.yes_no_per_cell, question_rng)]
        questions += mosaic_questions(slots) + named_questions(slots, question_rng)
        mosaics.append(Mosaic(slots, tuple(questions)))
    return mosaics


@dataclasses.dataclass(frozen=True)
class SplitSizes:
    """Mosaics per split and the distinct easy-VQA images (cells) they are built from."""

    train_mosaics: int = 500
    val_mosaics: int = 100
    test_mosaics: int = 300
    train_cells: int = 200
    val_cells: int = 50
    test_cells: int = 150


def build_splits(sizes: SplitSizes, config: MosaicConfig,
                 seed: int = 0) -> dict[str, list[Mosaic]]:
    """Train, val and test mosaics; no easy-VQA image appears in two splits.

    Train and val cells come from disjoint easy-VQA train images, test cells from
    easy-VQA test images. Layout and questions draw from separate generators, so the
    pixels (and the cached crops) do not change when the questions do.
    """
    rng, question_rng = random.Random(seed), random.Random(seed + 1)
    train_images = list(load_split("train"))
    rng.shuffle(train_images)
    test_images = list(load_split("test"))
    rng.shuffle(test_images)
    require(sizes.train_cells + sizes.val_cells <= len(train_images), "too many train+val cells")
    require(sizes.test_cells <= len(test_images), "too many test cells")
    sources = {
        "train": (tuple(train_images[:sizes.train_cells]), sizes.train_mosaics),
        "val": (tuple(train_images[sizes.train_cells:sizes.train_cells + sizes.val_cells]),
                sizes.val_mosaics),
        "test": (tuple(test_images[:sizes.test_cells]), sizes.test_mosaics),
    }
    splits = {}
    for name, (images, count) in sources.items():
        require(len(images) >= 4, f"the {name} split needs at least 4 cells")
        cells, blanks = make_cells(images, config, rng), make_blanks(images, config, rng)
        splits[name] = make_mosaics(cells, blanks, count, config, rng, question_rng)
    return splits


def question_words(text: str) -> list[str]:
    """Lower-case words of a question, punctuation dropped ("top-left" stays one word)."""
    return text.lower().replace("?", " ").replace(":", " ").replace(",", " ").split()
