"""The toy world: a small, fully offline world that plays the paper's whole story on CPU.

So far: the procedural captioned-image world (:mod:`ncppo.toy.world`) and its programmatic judge
(:mod:`ncppo.toy.oracle`). The tiny base model, the simulated annotators and the end-to-end run build on them.
"""
