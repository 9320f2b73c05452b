"""seq2seq: LSTM encoder-decoder machine translation with swappable attention.

Subpackages by layer, each importing only the ones before it (tests/test_layers.py):

- ``core``: configs, errors, files, checkpoints, RNG, tracking
- ``kernels``: the CPU speed kernels (torch and the standard library only)
- ``data``: corpus -> cleaning -> SentencePiece -> tokenized cache -> batches
- ``model``: the reference model (encoder, attention, decoder, network, losses) and the engines
- ``search``: greedy and beam search, translating many sentences
- ``evaluation``: metrics, reports, comparisons
- ``training``: the trainer and the optimizer

and on top the commands: ``cli`` (entry points, Hydra) and ``pipeline`` (what each command does).
"""

__version__ = "0.1.0"
