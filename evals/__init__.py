"""Measurement of HERO Serve beside the product: the fidelity benchmark on real DINOv2
features (`evals.fidelity`, `make fidelity`) and the lmms-eval adapter and VQA scorers
(`evals.lmms`). They depend on `hero_core`; `hero_core` never depends on them."""
