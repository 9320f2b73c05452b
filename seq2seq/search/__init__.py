"""Decoding through an engine: greedy and beam search with continuous batching (``continuous``),
the vocabulary side of a step (``stepscores``), what both share (``common``), and translating
many sentences in input order (``translate``). Imports ``core``, ``data`` and ``model``."""
