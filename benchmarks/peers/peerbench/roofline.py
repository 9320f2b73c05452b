"""Analytic FLOPs per target token of our model, and how close our training gets to the machine.

Counted: the multiply-adds of every matrix product (2 FLOPs each); elementwise work (gates'
nonlinearities, tanh, softmax, dropout) and embedding lookups are left out, so this is the useful
dense work, without the computation some toolkits spend on padding. Training costs about 3x the
forward pass (the backward pass computes gradients for inputs and weights, 2x forward).

Per target token (one decoder step), with S its source length (EOS included):

- encoder: 2 directions x LSTM(in, h) per *source* token, times the data's source/target ratio;
- attention keys (W_k h_s, once per source token) likewise; the bridge once per sentence;
- decoder LSTM over [embedding; context or fed-back attentional vector];
- attention: query projection (additive only), scores and context over S positions;
- h~ = tanh(W_c [h; c]) and the output projection over the vocabulary.
"""

from __future__ import annotations


def lstm_macs(input_size: int, hidden_size: int) -> int:
    """Multiply-adds of one LSTM step: four gates over [input; previous hidden]."""
    return 4 * hidden_size * (input_size + hidden_size)


def forward_macs_per_tgt_token(model: dict, src_vocab: int, tgt_vocab: int, stats: dict) -> dict[str, float]:
    """Forward multiply-adds per target token, by component. ``model`` is our resolved
    ``model`` config (plain dict); ``stats`` the training split's length statistics."""
    del src_vocab  # embedding lookups are not multiply-adds
    e, he, hd = model["embedding_size"], model["encoder_hidden_size"], model["decoder_hidden_size"]
    le, ld = model["encoder_layers"], model["decoder_layers"]
    att = model["attention"]
    kind, score, a = att["type"], att["score"], att["hidden_size"]
    d = 2 * he  # encoder output (both directions)
    p = e if model["tie_embeddings"] else hd  # attentional state h~
    ratio, s = stats["src_per_tgt_token"], stats["src_len_per_tgt_token"]
    additive = kind == "bahdanau" or (kind == "luong" and score == "concat")

    encoder = sum(2 * lstm_macs(e if layer == 0 else d, he) for layer in range(le))
    if kind == "none" or (kind == "luong" and score == "dot"):
        keys = 0
    else:
        keys = d * (a if additive else hd)
    feed = d if kind in ("bahdanau", "none") else (p if att["input_feeding"] else 0)
    decoder = lstm_macs(e + feed, hd) + sum(lstm_macs(hd, hd) for _ in range(ld - 1))
    if kind == "none":
        attention = 0.0
    elif additive:
        attention = hd * a + s * (a + d)  # query projection; v . tanh(...) and context per position
    else:
        attention = s * ((hd if score == "general" else d) + d)  # scores and context per position
    return {
        "encoder": encoder * ratio,
        "attention_keys": keys * ratio,
        "bridge": d * 2 * ld * hd / stats["tgt_len_mean"],
        "decoder_lstm": float(decoder),
        "attention": float(attention),
        "combine": float((hd + d) * p),
        "output_layer": float(p * tgt_vocab),
    }


def roofline(model: dict, src_vocab: int, tgt_vocab: int, stats: dict, tokens_per_s: float,
             precision: str, matmul: list[dict]) -> dict:
    """Training FLOPs per target token, achieved GFLOP/s at ``tokens_per_s``, and the share of the
    best measured matmul rate of the precision our run used."""
    parts = forward_macs_per_tgt_token(model, src_vocab, tgt_vocab, stats)
    forward_flops = 2.0 * sum(parts.values())
    train_flops = 3.0 * forward_flops
    achieved = train_flops * tokens_per_s / 1e9
    peaks = {}
    for row in matmul:
        peaks[row["dtype"]] = max(peaks.get(row["dtype"], 0.0), row["gflops"])
    peak = peaks.get(precision)
    return {
        "forward_macs_per_tgt_token": parts,
        "forward_flops_per_tgt_token": forward_flops,
        "train_flops_per_tgt_token": train_flops,
        "tokens_per_s": tokens_per_s,
        "achieved_gflops": achieved,
        "precision": precision,
        "peak_gflops": peaks,
        "utilisation": achieved / peak if peak else None,
        "matmul": matmul,
    }
