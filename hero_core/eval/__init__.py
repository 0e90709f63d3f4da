"""Benchmark evaluation: our VQA scorer and the lmms-eval model adapter.

* `hero_core.eval.answers`: the VQA answer normalisation lmms-eval applies.
* `hero_core.eval.vqa`: scores a JSONL of predictions as lmms-eval's VQAv2, TextVQA,
  GQA, POPE and MME tasks do (`python -m hero_core.eval.vqa FILE.jsonl`).
* `hero_core.eval.samples`: lmms-eval's logged samples plus the task's documents ->
  scorer records (`python -m hero_core.eval.samples ...`).
* `hero_core.eval.answerer`: one request in, one pruned LLaVA-NeXT answer out.
* `hero_core.eval.lmms`: the lmms-eval model `hero_llava_next` built on the answerer
  (`python -m hero_core.eval.lmms --tasks mme ...`). See docs/EVAL.md.

Nothing here imports lmms-eval at import time; only `lmms.HeroLlavaNext`, built on
first access, needs lmms-eval and its dependencies.
"""
