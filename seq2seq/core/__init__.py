"""The base layer: typed configs (``config``), errors, atomic files, checkpoints on disk, RNG
state, TensorBoard tracking. Imports no other part of seq2seq."""
