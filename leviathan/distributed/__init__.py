"""Multi-process training: the process world, the DeepSpeed engine and its config.

The model knows nothing of this package; the training loop meets it only through
`leviathan.train.loop.build_engine`.
"""
