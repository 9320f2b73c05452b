"""Corpora to token batches: loading (local files, the hub, the synthetic pair), cleaning,
SentencePiece, the tokenized cache, and the length-bucketed batches. Imports ``core``."""
