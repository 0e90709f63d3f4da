"""Our VQA scorer against lmms-eval 0.7.3's own scoring code, case by case.

lmms-eval is installed without its dependencies, so its task modules cannot be
imported (they import loguru, datasets, ...). The EvalAI processor module imports
only `re` and is loaded from its file; the task functions are taken from their source
files by name and executed verbatim, with the few names they use supplied in place of
the module's imports.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import re
import statistics
import string
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evals.lmms.answers import CONTRACTIONS, normalise_answer, normalise_vqav2_answer
from evals.lmms.vqa import parse_record, parse_yes_no, read_records, score_records
from hero_core.errors import InvalidInputError
from tests.conftest import ROOT

LMMS = Path(importlib.util.find_spec("lmms_eval").submodule_search_locations[0])


def load_module(relpath: str) -> Any:
    """An lmms-eval module with no third-party imports, loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"lmms_src_{Path(relpath).stem}",
                                                  LMMS / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_definitions(relpath: str, names: Sequence[str], **provided: Any) -> dict[str, Any]:
    """Top-level functions and assignments `names` of an lmms-eval source file, run
    unchanged in a namespace holding `provided` (what the file's imports would give)."""
    tree = ast.parse((LMMS / relpath).read_text())
    body = [node for node in tree.body if _defined_name(node) in names]
    assert sorted(_defined_name(n) for n in body) == sorted(names), f"{relpath} changed"
    namespace = dict(provided)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(LMMS / relpath), "exec"),
         namespace)
    return namespace


def _defined_name(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


PROCESSOR = load_module("tasks/_task_utils/vqa_eval_metric.py").EvalAIAnswerProcessor
TEXTVQA = load_definitions("tasks/textvqa/utils.py", ["textvqa_process_results"],
                           statistics=statistics, EvalAIAnswerProcessor=PROCESSOR)
VQAV2 = load_definitions("tasks/vqav2/utils.py", ["vqav2_process_results"],
                         statistics=statistics, EvalAIAnswerProcessor=PROCESSOR)
METRICS = load_definitions("api/metrics.py", ["exact_match_hf_evaluate"],
                           np=np, re=re, string=string)
POPE = load_module("tasks/pope/utils.py")
MME = load_definitions(
    "tasks/mme/utils.py",
    ["eval_type_dict", "parse_pred_ans", "mme_process_results", "mme_aggregate_results"],
    defaultdict=defaultdict, eval_logger=logging.getLogger("lmms_eval.mme"))

# Text cases: punctuation, articles, number words, contractions, case, spacing, ...
TEXTS = [
    "Dakota", "dakota.", "dakota!", "DAKOTA ", "  many   spaces  ", "new\nline", "tab\there",
    "the dog", "a cat", "An Apple", "the", "two", "Ten", "none", "eleven", "zero dogs",
    "dont", "Isnt", "im", "ive", "somebody'd", "y'allll", "hed've", "she's", "shes",
    "let's", "dog's", "its", "it's", "t-shirt", "t - shirt", "coca-cola", "n/a",
    "yes, it is", "yes,it is", "1,000", "1, 000", "3.5", "3.", ".5", "e.g.", "hello - world",
    "(left)", "( left )", '"quoted"', "what?", "why ?", "a+b=c", "under_score", "back\\slash",
    "<b>", "@home", "`tick`", "[x]", "{y}", "semi;colon", "colon: kept", "café", "",
    "." * 40 + "x", "a.b." * 20, "yes", "Yes.", "Yes!", "yeah", "no,", "No", "nope",
    "1", "one", "One.", "2 dogs", "two dogs", "11:30", "o'clock", "oclock", "ma'am",
]


@pytest.mark.parametrize("text", TEXTS)
def test_textvqa_normalisation_matches_evalai_processor(text):
    assert normalise_answer(text) == PROCESSOR()(text)


@pytest.mark.parametrize("text", TEXTS)
def test_vqav2_normalisation_matches_lmms_eval(text):
    processor = PROCESSOR()
    cleaned = text.replace("\n", " ").replace("\t", " ").strip()
    expected = processor.process_digit_article(processor.process_punctuation(cleaned))
    assert normalise_vqav2_answer(text) == expected


def test_contraction_table_matches_every_entry_that_can_apply():
    # Capitalised keys never match lower-cased words; x -> x entries change nothing.
    effective = {k: v for k, v in PROCESSOR.CONTRACTIONS.items() if k == k.lower() and k != v}
    assert effective == CONTRACTIONS


text_strategy = st.lists(
    st.sampled_from([*string.punctuation, " ", "  ", "\n", "\t", "'s", "a", "the", "two",
                     "ten", "dont", "hed've", "1", "9", ",", ".", "x", "Yes", "É"]),
    max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(text_strategy)
def test_normalisation_matches_on_random_punctuated_text(text):
    processor = PROCESSOR()
    assert normalise_answer(text) == processor(text)
    cleaned = text.replace("\n", " ").replace("\t", " ").strip()
    assert normalise_vqav2_answer(text) == processor.process_digit_article(
        processor.process_punctuation(cleaned))


def agreement(prediction: str, matching: int, other: str = "cat") -> tuple[str, list[str]]:
    """A prediction and 10 answers of which `matching` equal it."""
    return prediction, [prediction] * matching + [other] * (10 - matching)


def vqav2_answers(answers: list[str]) -> list[dict[str, Any]]:
    """VQAv2's answer records: distinct answer ids, so each answer is its own entry."""
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(answers)]


VQA_CASES = [
    agreement("dog", 10), agreement("dog", 4), agreement("dog", 3), agreement("dog", 2),
    agreement("dog", 1), agreement("dog", 0),
    ("Dog.", ["dog"] * 2 + ["a dog"] * 2 + ["the dog!"] + ["puppy"] * 5),
    ("two", ["2"] * 3 + ["two"] * 2 + ["Two."] + ["3"] * 4),
    ("dont know", ["don't know"] * 3 + ["dont know"] * 7),
    ("yes, it is", ["yes it is"] * 5 + ["yes"] * 5),
    ("1,000", ["1000"] * 4 + ["1,000"] * 4 + ["one thousand"] * 2),
    ("T-Shirt", ["t shirt"] * 3 + ["tshirt"] * 3 + ["t-shirt"] * 4),
    ("  Yes  ", ["yes"] * 9 + ["no"]),
    ("the dog's bone", ["dogs bone"] * 5 + ["dog's bone"] * 5),
    ("", [""] * 2 + ["nothing"] * 8),
    ("3.5", ["3.5"] * 6 + ["35"] * 4),
    ("Coca-Cola\n", ["coca cola"] * 7 + ["coke"] * 3),
    ("an apple", ["apple"]),
    ("dog", ["dog", "dog", "cat"]),
]


@pytest.mark.parametrize(("prediction", "answers"), VQA_CASES)
def test_textvqa_accuracy_matches_lmms_eval(prediction, answers):
    doc = {"question_id": 7, "answers": list(answers)}
    expected = TEXTVQA["textvqa_process_results"](doc, [prediction.strip()])["exact_match"]
    record = parse_record({"question_id": 7, "task": "textvqa", "answers": answers,
                           "prediction": prediction}, None)
    assert score_records([record])["textvqa"]["exact_match"] == pytest.approx(expected)


@pytest.mark.parametrize(("prediction", "answers"), VQA_CASES)
def test_vqav2_accuracy_matches_lmms_eval(prediction, answers):
    doc = {"question_id": 7, "answers": vqav2_answers(answers)}
    expected = VQAV2["vqav2_process_results"](doc, [prediction.strip()])["exact_match"]
    record = parse_record({"question_id": 7, "task": "vqav2", "answers": answers,
                           "prediction": prediction}, None)
    assert score_records([record])["vqav2"]["exact_match"] == pytest.approx(expected)


def test_partial_agreement_gives_the_leave_one_out_fractions():
    scores = []
    for matching in (0, 1, 2, 3, 4, 10):
        prediction, answers = agreement("dog", matching)
        record = parse_record({"question_id": 1, "task": "textvqa", "answers": answers,
                               "prediction": prediction}, None)
        scores.append(score_records([record])["textvqa"]["exact_match"])
    assert scores == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0, 1.0])


GQA_CASES = [("Yes", "yes"), ("yes.", "yes"), ("left ", "left"), ("the left", "left"),
             ("t-shirt", "tshirt"), ("T-Shirt", "t shirt"), ("No", "yes"), ("", ""),
             ("man's", "mans"), ("white", "white "), ("2", "two")]


@pytest.mark.parametrize(("prediction", "answer"), GQA_CASES)
def test_gqa_exact_match_matches_lmms_eval(prediction, answer):
    expected = METRICS["exact_match_hf_evaluate"](
        predictions=[prediction.strip()], references=[answer], ignore_case=True,
        ignore_punctuation=True)["exact_match"]
    record = parse_record({"question_id": 1, "task": "gqa", "answers": [answer],
                           "prediction": prediction}, None)
    assert score_records([record])["gqa"]["exact_match"] == expected


POPE_SETS = {
    "mixed": [("Yes", "yes"), ("yes.", "yes"), ("No", "no"), (" no ", "yes"), ("yes", "no"),
              ("No, there is not.", "no"), ("", "yes"), ("YES", "Yes")],
    "all_no": [("no", "no"), ("no", "yes"), ("no", "no")],
    "never_no": [("yes", "yes"), ("maybe", "yes"), ("yes", "no")],
}


@pytest.mark.parametrize("name", sorted(POPE_SETS))
def test_pope_metrics_match_lmms_eval(name):
    pairs = POPE_SETS[name]
    per_doc = [POPE.pope_process_results({"question_id": i, "answer": truth}, [pred.strip()])
               for i, (pred, truth) in enumerate(pairs)]
    aggregate = {"pope_accuracy": POPE.pope_aggregate_accuracy,
                 "pope_precision": POPE.pope_aggregate_precision,
                 "pope_recall": POPE.pope_aggregate_recall,
                 "pope_f1_score": POPE.pope_aggregate_f1_score,
                 "pope_yes_ratio": POPE.pope_aggregate_yes_ratio}
    expected = {k: fn([d[k] for d in per_doc]) for k, fn in aggregate.items()}
    records = [parse_record({"question_id": i, "task": "pope", "answers": [truth],
                             "prediction": pred}, None) for i, (pred, truth) in enumerate(pairs)]
    ours = score_records(records)["pope"]
    assert {k: ours[k] for k in expected} == pytest.approx(expected)


MME_ANSWERS = ["Yes", "yes.", "No", "no.", "y", "N", "x", "", "Yes, there is", "Nope",
               "not sure", "The answer is yes", "yesno", "nO.", "ye", "...yes"]


@pytest.mark.parametrize("prediction", MME_ANSWERS)
def test_mme_answer_parsing_matches_lmms_eval(prediction):
    assert parse_yes_no(prediction) == MME["parse_pred_ans"](prediction)


def mme_docs() -> list[tuple[dict[str, str], str]]:
    """Paired questions over perception and cognition categories, mixed outcomes."""
    categories = ["existence", "OCR", "count", "code_reasoning", "text_translation"]
    docs, outcome = [], 0
    for category in categories:
        for image in range(3):
            for truth in ("Yes", "No"):
                outcome += 1
                prediction = MME_ANSWERS[(outcome * 7) % len(MME_ANSWERS)]
                docs.append(({"question_id": f"{category}/{image}.png", "category": category,
                              "answer": truth}, prediction))
    return docs


def test_mme_scores_match_lmms_eval():
    by_key: dict[str, list[Any]] = defaultdict(list)
    for doc, prediction in mme_docs():
        for key, value in MME["mme_process_results"](doc, [prediction.strip()]).items():
            by_key[key].append(value)
    records = [parse_record({**doc, "task": "mme", "answers": [doc["answer"]],
                             "prediction": prediction}, None) for doc, prediction in mme_docs()]
    ours = score_records(records)["mme"]
    for key in ("mme_perception_score", "mme_cognition_score"):
        assert ours[key] == pytest.approx(MME["mme_aggregate_results"](by_key[key]))
    assert 0 < ours["mme_perception_score"] < 600 and 0 < ours["mme_cognition_score"] < 400


def test_mme_refuses_unpaired_questions():
    record = parse_record({"question_id": "a.png", "task": "mme", "category": "count",
                           "answers": ["Yes"], "prediction": "yes"}, None)
    with pytest.raises(InvalidInputError, match="pairs two questions"):
        score_records([record])


def test_bad_records_name_their_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    good = {"question_id": 1, "answers": ["yes"], "prediction": "yes"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "answers": "yes"}) + "\n")
    with pytest.raises(InvalidInputError, match=r"preds.jsonl:3: `answers` must be a list"):
        read_records(path, "gqa")
    with pytest.raises(InvalidInputError, match="task must be one of"):
        read_records(path)
    path.write_text(json.dumps({**good, "task": "pope", "answers": ["maybe"]}) + "\n")
    with pytest.raises(InvalidInputError, match="must be yes or no"):
        score_records(read_records(path))


def test_command_line_scores_a_mixed_file(tmp_path):
    path = tmp_path / "preds.jsonl"
    rows = [{"question_id": 1, "task": "textvqa", "image": "a.jpg", "question": "brand?",
             "answers": ["Dakota"] * 3 + ["nikon"] * 7, "prediction": "dakota."},
            {"question_id": 2, "answers": ["left"], "prediction": "Left"},
            {"question_id": 3, "answers": ["right"], "prediction": "left"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "evals.lmms.vqa", str(path), "--task",
                          "gqa"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert results["textvqa"] == {"exact_match": pytest.approx(0.9), "count": 1.0}
    assert results["gqa"] == {"exact_match": 0.5, "count": 2.0}


# Lines as `lmms_eval --log_samples` writes them (0.7.3): no document, the answer in
# `filtered_resps` (a string; older releases wrote a one-element list).
SAMPLES = [{"doc_id": 1, "target": "answer", "filtered_resps": "Dakota.", "token_counts": [None],
            "doc_hash": "74234e98", "exact_match": 0.9, "input": "What brand?"},
           {"doc_id": 0, "target": "answer", "filtered_resps": ["nikon"], "doc_hash": "74234e98"}]
DOCS = {
    "textvqa": [{"question_id": 10, "question": "q0", "answers": ["nikon"] * 10},
                {"question_id": 11, "question": "q1", "answers": ["dakota"] * 3 + ["x"] * 7}],
    "vqav2": [{"question_id": 10, "answers": vqav2_answers(["nikon"] * 10)},
              {"question_id": 11, "answers": vqav2_answers(["dakota"] * 3 + ["x"])}],
    "gqa": [{"id": "g0", "answer": "nikon"}, {"id": "g1", "answer": "dakota"}],
}


@pytest.mark.parametrize(("task", "expected"), [("textvqa", 0.95), ("vqav2", 0.875), ("gqa", 1.0)])
def test_logged_lmms_samples_become_scorable_records(tmp_path, task, expected):
    samples, docs, out = tmp_path / "samples.jsonl", tmp_path / "docs.jsonl", tmp_path / "r.jsonl"
    samples.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS[task]))
    made = subprocess.run([sys.executable, "-m", "evals.lmms.samples", str(samples),
                           str(docs), "--task", task, "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    records = read_records(out)
    assert [r.prediction for r in records] == ["Dakota.", "nikon"]
    assert records[0].question_id == str(DOCS[task][1].get("question_id", "g1"))
    assert score_records(records)[task]["exact_match"] == pytest.approx(expected)


def test_samples_of_another_task_are_refused_by_name(tmp_path):
    samples, docs = tmp_path / "samples.jsonl", tmp_path / "docs.jsonl"
    samples.write_text(json.dumps(SAMPLES[1]) + "\n")
    docs.write_text(json.dumps(DOCS["gqa"][0]) + "\n")
    out = subprocess.run([sys.executable, "-m", "evals.lmms.samples", str(samples),
                          str(docs), "--task", "mme", "-o", str(tmp_path / "r.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "lacks the mme field 'question_id'" in out.stderr
