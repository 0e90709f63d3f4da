"""Score VQA predictions the way lmms-eval 0.7.3 scores its VQA tasks.

Input is JSON Lines, one question per line:

    {"question_id": "34602", "task": "textvqa", "image": "val/003a8ae2.jpg",
     "question": "what is the brand of this camera?",
     "answers": ["nous les gosses", "dakota", ...], "prediction": "Dakota"}

Fields (unknown fields are ignored):

* `question_id` (str or int, required): MME pairs its two questions per image by it,
  so for MME it is the image's id (lmms-eval's MME `question_id` is the image file).
* `task` (required unless `--task` gives a default): one of `TASKS`.
* `answers` (list of str, required): the human answers; VQAv2 and TextVQA have 10,
  GQA, POPE and MME one.
* `prediction` (str, required): the model's raw answer text.
* `category` (str): MME subtask ("existence", "OCR", ...); required for MME.
* `question`, `image` (str): carried for reading the file; not used in scoring.

Rules, each the one lmms-eval's task applies (predictions are stripped first, as
lmms-eval's task does before scoring):

* `vqav2`, `textvqa`: VQA accuracy over the human answers after answer normalisation
  (`evals.lmms.answers`): leaving each answer out in turn, the prediction scores
  min(1, matches among the others / 3); the record's accuracy is the mean. TextVQA
  applies the full EvalAI processing, VQAv2 all but its word step.
* `gqa`: exact match after lower-casing and deleting ASCII punctuation.
* `pope`: lower-cased prediction equal to "yes"/"no" (no punctuation stripping);
  accuracy, precision, recall, F1 and the ground truth's yes ratio.
* `mme`: yes/no parsed from the answer's first characters; per category the mean over
  images of accuracy + accuracy+ (both questions right), summed over the perception
  and the cognition categories (maxima 2000 and 800).

`python -m evals.lmms.vqa FILE.jsonl... [--task T]` prints the metrics as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import string
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from evals.lmms.answers import normalise_answer, normalise_vqav2_answer
from hero_core.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class Record:
    """One scored question; see the module docstring for the JSONL fields."""

    question_id: str
    task: str
    answers: tuple[str, ...]
    prediction: str
    category: str | None = None
    question: str = ""
    image: str = ""


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Leave-one-out VQA accuracy of normalised `prediction` among normalised `answers`."""
    if not answers:
        raise InvalidInputError("VQA accuracy needs at least one human answer")
    scores = []
    for left_out in range(len(answers)):
        matches = sum(1 for i, answer in enumerate(answers)
                      if i != left_out and answer == prediction)
        scores.append(min(1.0, matches / 3))
    return mean(scores)


def score_vqa(records: Sequence[Record],
              normalise: Callable[[str], str]) -> dict[str, float]:
    """Mean VQA accuracy, every answer and the prediction passed through `normalise`."""
    accuracies = [vqa_accuracy(normalise(r.prediction), [normalise(a) for a in r.answers])
                  for r in records]
    return {"exact_match": mean(accuracies)}


_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, answer: str) -> bool:
    """GQA's match: equal after lower-casing and deleting ASCII punctuation."""
    return (prediction.lower().translate(_PUNCTUATION_TABLE)
            == answer.lower().translate(_PUNCTUATION_TABLE))


def score_gqa(records: Sequence[Record]) -> dict[str, float]:
    """Mean exact match against the single answer."""
    return {"exact_match": mean(float(exact_match(r.prediction, _single(r)))
                                for r in records)}


def _single(record: Record) -> str:
    if len(record.answers) != 1:
        raise InvalidInputError(f"{record.task} question {record.question_id} needs exactly "
                                f"one answer, got {len(record.answers)}")
    return record.answers[0]


def _yes_no(record: Record, answer: str) -> str:
    if answer not in ("yes", "no"):
        raise InvalidInputError(f"{record.task} question {record.question_id}: the answer "
                                f"must be yes or no, got {answer!r}")
    return answer


def score_pope(records: Sequence[Record]) -> dict[str, float]:
    """POPE accuracy, precision, recall and F1 of "yes", and the ratio of "yes" truths.

    Only a prediction that is exactly "no" counts as a false negative, as in lmms-eval.
    """
    pairs = [(r.prediction.lower().strip(), _yes_no(r, _single(r).lower().strip()))
             for r in records]
    true_pos = sum(1 for p, t in pairs if p == t == "yes")
    false_pos = sum(1 for p, t in pairs if p == "yes" and t == "no")
    false_neg = sum(1 for p, t in pairs if p == "no" and t == "yes")
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    return {
        "pope_accuracy": mean(float(p == t) for p, t in pairs),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": _ratio(2 * precision * recall, precision + recall),
        "pope_yes_ratio": _ratio(sum(1 for _, t in pairs if t == "yes"), len(pairs)),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


MME_PERCEPTION = frozenset({"existence", "count", "position", "color", "posters", "celebrity",
                            "scene", "landmark", "artwork", "OCR"})
"""MME's perception categories; every other category counts as cognition (as in
lmms-eval), whose four are commonsense_reasoning, numerical_calculation,
text_translation and code_reasoning."""


def parse_yes_no(prediction: str) -> str:
    """MME's reading of an answer: "yes", "no" or "other".

    Periods are dropped; "y"/"n" alone count; a longer answer counts by whether "yes",
    else "no", occurs in its first four characters.
    """
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_category_score(scores_by_image: dict[str, list[float]]) -> float:
    """Mean over images of accuracy + accuracy+ (both right), in points (max 200)."""
    total = 0.0
    for image_id, scores in scores_by_image.items():
        if len(scores) != 2:
            raise InvalidInputError(f"MME pairs two questions per image; question_id "
                                    f"{image_id!r} has {len(scores)}")
        total += 100.0 * sum(scores) / 2 + (100.0 if sum(scores) == 2 else 0.0)
    return total / len(scores_by_image)


def score_mme(records: Sequence[Record]) -> dict[str, float]:
    """MME perception and cognition scores (sums of category scores) and each category."""
    by_category: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.category is None:
            raise InvalidInputError(f"MME question {r.question_id} needs a category")
        truth = _yes_no(r, _single(r).lower().strip().replace(".", ""))
        score = float(parse_yes_no(r.prediction) == truth)
        by_category[r.category][r.question_id].append(score)
    categories = {c: mme_category_score(s) for c, s in sorted(by_category.items())}
    metrics = {f"mme_{c}": v for c, v in categories.items()}
    perception = [v for c, v in categories.items() if c in MME_PERCEPTION]
    cognition = [v for c, v in categories.items() if c not in MME_PERCEPTION]
    if perception:
        metrics["mme_perception_score"] = sum(perception)
    if cognition:
        metrics["mme_cognition_score"] = sum(cognition)
    return metrics


TASKS: dict[str, Callable[[Sequence[Record]], dict[str, float]]] = {
    "vqav2": lambda records: score_vqa(records, normalise_vqav2_answer),
    "textvqa": lambda records: score_vqa(records, normalise_answer),
    "gqa": score_gqa,
    "pope": score_pope,
    "mme": score_mme,
}
"""Task name -> scorer of that task's records; metric names are lmms-eval's."""


def score_records(records: Iterable[Record]) -> dict[str, dict[str, float]]:
    """Metrics per task (`{"textvqa": {"exact_match": 0.61}, ...}`) plus `count`."""
    by_task: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_task[record.task].append(record)
    results = {}
    for task, task_records in sorted(by_task.items()):
        results[task] = {**TASKS[task](task_records), "count": float(len(task_records))}
    return results


def parse_record(data: Any, default_task: str | None) -> Record:
    """A `Record` from one decoded JSON object; `InvalidInputError` names what is wrong."""
    if not isinstance(data, dict):
        raise InvalidInputError("each line must be a JSON object")
    task = data.get("task", default_task)
    if task not in TASKS:
        raise InvalidInputError(f"task must be one of {', '.join(TASKS)} (field `task` or "
                                f"--task), got {task!r}")
    answers, prediction = data.get("answers"), data.get("prediction")
    if not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
        raise InvalidInputError("`answers` must be a list of strings")
    if not isinstance(prediction, str):
        raise InvalidInputError("`prediction` must be a string")
    if not isinstance(data.get("question_id"), (str, int)):
        raise InvalidInputError("`question_id` must be a string or an integer")
    category = data.get("category")
    return Record(question_id=str(data["question_id"]), task=task, answers=tuple(answers),
                  prediction=prediction.strip(),
                  category=None if category is None else str(category),
                  question=str(data.get("question", "")), image=str(data.get("image", "")))


def read_records(path: Path, default_task: str | None = None) -> list[Record]:
    """Every record of a JSONL file; blank lines are skipped, errors name the line."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_record(json.loads(line), default_task))
            except (json.JSONDecodeError, InvalidInputError) as exc:
                raise InvalidInputError(f"{path}:{number}: {exc}") from exc
    return records


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="JSON Lines files of predictions")
    parser.add_argument("--task", choices=sorted(TASKS),
                        help="task of records without a `task` field")
    args = parser.parse_args(argv)
    try:
        results = score_records(r for path in args.paths for r in read_records(path, args.task))
    except (OSError, InvalidInputError) as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
