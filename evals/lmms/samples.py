"""Turn lmms-eval's logged samples into scorer records (`evals.lmms.vqa` JSONL).

`lmms_eval --log_samples` writes one `*_samples_<task>.jsonl` per task whose lines
hold `doc_id` and the model's answer (`filtered_resps`) but not the document, so the
human answers come from the task's dataset split, exported once to JSON Lines:

    datasets.load_dataset(PATH, NAME, split=SPLIT).remove_columns("image").to_json(DOCS)

(PATH, NAME and SPLIT are the task YAML's `dataset_path`, `dataset_name` and
`test_split`; line i of DOCS is document `doc_id` i.) Then

    python -m evals.lmms.samples SAMPLES.jsonl DOCS.jsonl --task textvqa -o OUT.jsonl

writes records that `python -m evals.lmms.vqa OUT.jsonl` scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from evals.lmms.vqa import TASKS
from hero_core.errors import InvalidInputError

Doc = Mapping[str, Any]

DOC_FIELDS: dict[str, tuple[str, Callable[[Doc], list[str]]]] = {
    "textvqa": ("question_id", lambda doc: list(doc["answers"])),
    "vqav2": ("question_id", lambda doc: [a["answer"] for a in doc["answers"]]),
    "gqa": ("id", lambda doc: [doc["answer"]]),
    "pope": ("question_id", lambda doc: [doc["answer"]]),
    "mme": ("question_id", lambda doc: [doc["answer"]]),
}
"""Task -> (the document's id field, its human answers) in the lmms-eval datasets."""


def prediction_of(sample: Mapping[str, Any]) -> str:
    """The answer text of one logged sample (`filtered_resps`, a string or a list)."""
    answer = sample.get("filtered_resps")
    while isinstance(answer, list) and answer:
        answer = answer[0]
    if not isinstance(answer, str):
        raise InvalidInputError(f"sample {sample.get('doc_id')!r} has no text answer in "
                                "`filtered_resps`")
    return answer


def record_of(sample: Mapping[str, Any], docs: Sequence[Doc], task: str) -> dict[str, Any]:
    """The scorer record (see `evals.lmms.vqa`) of one logged sample."""
    doc_id = sample.get("doc_id")
    if not (isinstance(doc_id, int) and 0 <= doc_id < len(docs)):
        raise InvalidInputError(f"doc_id {doc_id!r} is not a line of the documents file "
                                f"({len(docs)} lines)")
    doc = docs[doc_id]
    id_field, answers = DOC_FIELDS[task]
    try:
        record = {"question_id": doc[id_field], "task": task,
                  "question": doc.get("question", ""), "answers": answers(doc),
                  "prediction": prediction_of(sample)}
    except (KeyError, TypeError) as exc:
        raise InvalidInputError(f"document {doc_id} lacks the {task} field {exc}; are the "
                                "documents those of this task?") from exc
    if "category" in doc:
        record["category"] = doc["category"]
    return record


def read_jsonl(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidInputError(f"{path}:{number}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, help="lmms-eval *_samples_<task>.jsonl")
    parser.add_argument("docs", type=Path, help="the task split's documents as JSON Lines")
    parser.add_argument("--task", required=True, choices=sorted(DOC_FIELDS),
                        help="scoring rule of these samples")
    parser.add_argument("-o", "--out", type=Path, required=True, help="records to write")
    args = parser.parse_args(argv)
    assert set(DOC_FIELDS) <= set(TASKS)
    try:
        docs = list(read_jsonl(args.docs))
        records = [record_of(s, docs, args.task) for s in read_jsonl(args.samples)]
    except (OSError, InvalidInputError) as exc:
        sys.exit(f"error: {exc}")
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"{len(records)} records written to {args.out}")


if __name__ == "__main__":
    main()
