"""The processes a run is laid out over: the world, expert parallelism, DeepSpeed's config.

The model knows nothing of this package: `parallelize` splits a model built whole over
the world's ranks. It imports nothing from `leviathan.train`, whose engines build on it.
"""
