"""Fidelity benchmark: how much answer accuracy each pruning method keeps, on real features.

A small high-resolution VQA task (2x2 mosaics of easy-VQA images, `data`) goes
through the real AnyRes tiling and a real DINOv2 ViT-S/14 once (`features`, cached
per crop); a small answer model is trained on all tokens (`answer_model`) and then
evaluated on the tokens each method keeps (`evaluation`). HERO's relevance term is
measured with DINOv2's question encoder (`relevance` learns its projection; `routing`
scores selections that follow the question). `run` ties it together and `report`
writes docs/FIDELITY.md. Entry point: `python -m evals.fidelity`.
"""
