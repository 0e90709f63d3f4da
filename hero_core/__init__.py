"""hero_core: the HERO pruning library of HERO Serve.

Pure algorithm code (tiling, the CLS-attention probe, pruning methods and their
registry, packing, serialisation, cache entries, model loading) that imports only the
standard library, numpy, torch, transformers, safetensors and PIL. Every caller runs
the two stages of `hero_core.stages` (an image into its cache entry, an entry into one
request's tokens); start with `hero_core.pipeline.Pruner`, which runs both, and
`hero_core.methods.create_method`.
"""
