"""hero_core: the HERO pruning library of HERO Serve.

Pure algorithm code (tiling, the CLS-attention probe, pruning methods and their
registry, packing, serialisation, cache entries, model loading) that imports only the
standard library, numpy, torch, transformers and PIL. Start with
`hero_core.pipeline.Pruner` and `hero_core.methods.create_method`.
"""
