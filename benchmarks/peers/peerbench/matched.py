"""The one model and optimiser every toolkit trains, in one place so the three configs agree."""

from __future__ import annotations

EMBEDDING_SIZE = 256
ENCODER_HIDDEN_SIZE = 256  # per direction of the bidirectional LSTM
DECODER_HIDDEN_SIZE = 512
LAYERS = 1
DROPOUT = 0.2
LEARNING_RATE = 1e-3  # Adam, betas (0.9, 0.999), constant
CLIP_NORM = 5.0
DECODE_BATCH_SENTENCES = 64
LENGTH_PENALTY_ALPHA = 1.0  # beam search: ((5 + len) / 6) ** alpha (Wu et al. 2016), as ours


def ours_model_overrides() -> list[str]:
    """Pin our model sizes explicitly (they are also our defaults, configs/model/lstm.yaml)."""
    return [f"model.embedding_size={EMBEDDING_SIZE}", f"model.encoder_hidden_size={ENCODER_HIDDEN_SIZE}",
            f"model.decoder_hidden_size={DECODER_HIDDEN_SIZE}", f"model.encoder_layers={LAYERS}",
            f"model.decoder_layers={LAYERS}", f"model.dropout={DROPOUT}", "model.tie_embeddings=false",
            f"optim.lr={LEARNING_RATE}", f"optim.clip_norm={CLIP_NORM}", "optim.name=adam",
            "optim.scheduler=constant", "trainer.label_smoothing=0.0", "trainer.teacher_forcing=1.0"]
