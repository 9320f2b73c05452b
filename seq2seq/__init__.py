"""seq2seq: LSTM encoder-decoder machine translation with swappable attention.

The package layout follows the pipeline: config -> corpus -> tokenizer -> batching -> model
(encoder, attention, decoder) -> search / metrics / checkpoint / tracking -> trainer -> pipeline.
"""

__version__ = "0.1.0"
