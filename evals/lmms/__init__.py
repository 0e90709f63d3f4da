"""Benchmark evaluation: our VQA scorer and the lmms-eval model adapter.

* `evals.lmms.answers`: the VQA answer normalisation lmms-eval applies.
* `evals.lmms.vqa`: scores a JSONL of predictions as lmms-eval's VQAv2, TextVQA,
  GQA, POPE and MME tasks do (`python -m evals.lmms.vqa FILE.jsonl`).
* `evals.lmms.samples`: lmms-eval's logged samples plus the task's documents ->
  scorer records (`python -m evals.lmms.samples ...`).
* `evals.lmms.answerer`: one request in, one pruned LLaVA-NeXT answer out.
* `evals.lmms.lmms`: the lmms-eval model `hero_llava_next` built on the answerer
  (`python -m evals.lmms.lmms --tasks mme ...`). See docs/EVAL.md.

Nothing here imports lmms-eval at import time; only `lmms.HeroLlavaNext`, built on
first access, needs lmms-eval and its dependencies.
"""
