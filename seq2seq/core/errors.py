"""User-facing errors.

Everything the user can get wrong (a config key, a corpus file, a run directory) raises a subclass
of ``Seq2SeqError`` with a one-line message that names the key, file or line and says what to do.
Entry points print that line and exit non-zero; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations


class Seq2SeqError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""

    exit_code = 2


class ConfigError(Seq2SeqError):
    """A config value that composes but cannot work (a negative size, an unknown language...)."""


class DataError(Seq2SeqError):
    """A corpus that is missing, misaligned, undecodable or empty."""


class RunDirError(Seq2SeqError):
    """A run directory that cannot be written, resumed or evaluated."""


class CheckpointError(Seq2SeqError):
    """A checkpoint that is missing, corrupt, unsafe, or does not match its config."""


class TrainingError(Seq2SeqError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is kept."""
