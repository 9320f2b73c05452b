"""OpenNMT-py 3.5.1: a YAML config for the matched model, its per-update log, its translate timer.

``-global_attention mlp`` is the additive (Bahdanau) score and ``general`` Luong's bilinear one;
with ``-input_feed 1`` (its default) both attend with the current decoder state and feed the
attentional vector back, like Joey. ``-encoder_type brnn`` splits ``enc_hid_size`` between the two
directions (512 = 2 x 256); the decoder starts from the encoder's final states (no bridge).

``train.py`` of OpenNMT-py ignores unknown options silently, so the parameter count it logs is
the check that the model is the intended one (the report prints it next to ours).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from peerbench import matched
from peerbench.envs import ONMT, ensure_env, package_versions, venv_python
from peerbench.procs import BenchError, StepPoint, check_ok, child_env, log_time, run_logged
from peerbench.toolkit import DecodeOutcome, DecodeSpec, Toolkit, TrainOutcome, TrainSpec, Workspace

# [2026-11-21 02:20:42,123 INFO] Step 5/  300; acc: ...; sents:      64; bsz:   15/  16/64; ...
STEP_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO\] Step\s+(\d+)(?:/\s*\d+)?;"
                       r".*bsz:\s*([\d.]+)/\s*([\d.]+)/\s*([\d.]+);")
PARAMS_LINE = re.compile(r"\* number of parameters: (\d+)")
TOKENS_PER_S_LINE = re.compile(r"Tokens per second: ([\d.]+)")
TOTAL_TIME_LINE = re.compile(r"Total translation time \(s\): ([\d.]+)")
ATTENTION = {"bahdanau": "mlp", "luong": "general"}


def train_config(spec: TrainSpec) -> dict:
    corpus = spec.corpus
    if spec.batching == "tokens":
        batch = {"batch_type": "tokens", "batch_size": spec.max_tokens}
    else:
        batch = {"batch_type": "sents", "batch_size": spec.batch_sentences}
    return {
        "save_model": str(spec.run_dir / "model"),
        "overwrite": True,
        "data": {"corpus_1": {"path_src": str(corpus.file(corpus.train, corpus.src_lang)),
                              "path_tgt": str(corpus.file(corpus.train, corpus.tgt_lang)),
                              "transforms": []}},
        "src_vocab": str(corpus.vocab), "tgt_vocab": str(corpus.vocab), "share_vocab": True,
        "src_vocab_size": 1_000_000, "tgt_vocab_size": 1_000_000,  # keep every piece of the file
        "encoder_type": "brnn", "decoder_type": "rnn", "rnn_type": "LSTM",
        "enc_layers": matched.LAYERS, "dec_layers": matched.LAYERS,
        "enc_hid_size": 2 * matched.ENCODER_HIDDEN_SIZE, "dec_hid_size": matched.DECODER_HIDDEN_SIZE,
        "word_vec_size": matched.EMBEDDING_SIZE,
        "global_attention": ATTENTION[spec.attention], "input_feed": 1, "bridge": False,
        "dropout": [matched.DROPOUT],
        "optim": "adam", "adam_beta1": 0.9, "adam_beta2": 0.999, "learning_rate": matched.LEARNING_RATE,
        "max_grad_norm": matched.CLIP_NORM, "decay_method": "none",
        "start_decay_steps": 10 * spec.steps + 1_000_000,  # constant learning rate
        **batch, "accum_count": [1], "normalization": "tokens",
        "train_steps": spec.steps, "valid_steps": spec.steps + 1, "save_checkpoint_steps": spec.steps,
        "report_every": 1,  # a log line per update
        "seed": spec.seed, "num_workers": 0,  # data loading in the training process, as for the others
        "world_size": 1, "gpu_ranks": [], "model_dtype": "fp32",
    }


def parse_train_log(text: str) -> tuple[list[StepPoint], int | None]:
    """Update points from the per-update report lines: with ``report_every 1`` the middle ``bsz``
    figure is that update's target-token count (exactly)."""
    points = []
    for line in text.splitlines():
        m = STEP_LINE.match(line)
        if m:
            points.append(StepPoint(step=int(m.group(2)), time=log_time(m.group(1)), tokens=float(m.group(4))))
    params = PARAMS_LINE.search(text)
    return points, int(params.group(1)) if params else None


class OpenNMT(Toolkit):
    name = "onmt"
    label = "OpenNMT-py"

    def __init__(self, work: Workspace) -> None:
        super().__init__(work)
        self.python = venv_python(work.venvs, ONMT)

    def setup(self, log: Path) -> None:
        self.python = ensure_env(self.work.venvs, ONMT, log)

    def versions(self) -> dict[str, str]:
        return package_versions(self.python, (ONMT.dist,))

    def train(self, spec: TrainSpec) -> TrainOutcome:
        config_path = spec.run_dir / "onmt-train.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(train_config(spec), sort_keys=False), encoding="utf-8")
        cmd = [str(self.python), "-m", "onmt.bin.train", "-config", str(config_path)]
        proc = run_logged(cmd, spec.log, child_env(spec.threads))
        check_ok(proc, "training", spec.log)
        points, params = parse_train_log(spec.log.read_text(encoding="utf-8", errors="replace"))
        checkpoint = spec.run_dir / f"model_step_{spec.steps}.pt"
        if not checkpoint.is_file():
            raise BenchError(f"training ended without {checkpoint.name}; log: {spec.log}")
        return TrainOutcome(points=points, params=params, proc=proc, model=checkpoint,
                            info={"config": str(config_path)})

    def decode(self, spec: DecodeSpec) -> DecodeOutcome:
        corpus = spec.corpus
        cmd = [str(self.python), "-m", "onmt.bin.translate", "-model", str(spec.model),
               "-src", str(corpus.file(corpus.test, corpus.src_lang)), "-output", str(spec.out),
               "-beam_size", str(spec.beam), "-batch_size", str(matched.DECODE_BATCH_SENTENCES),
               "-batch_type", "sents", "-report_time", "-seed", "1"]
        if spec.beam == 1:  # argmax decoding through its GreedySearch ("1 to use argmax")
            cmd += ["-random_sampling_topk", "1"]
        else:
            cmd += ["-length_penalty", "wu", "-alpha", str(matched.LENGTH_PENALTY_ALPHA)]
        # Its checkpoints hold pickled objects that torch >= 2.6 refuses by default; allow that for
        # this process only, for OpenNMT-py's own files.
        proc = run_logged(cmd, spec.log, child_env(spec.threads, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}))
        check_ok(proc, "decoding", spec.log)
        text = spec.log.read_text(encoding="utf-8", errors="replace")
        rate, total = TOKENS_PER_S_LINE.search(text), TOTAL_TIME_LINE.search(text)
        if rate is None or total is None or not spec.out.is_file():
            raise BenchError(f"decoding wrote no timing or no output; log: {spec.log}")
        words = sum(len(line.split()) for line in spec.out.read_text(encoding="utf-8").splitlines())
        if float(rate.group(1)) > 0 and words:
            # its total time is printed to 0.1 s; its tokens/s (same clock, same tokens) is finer
            return DecodeOutcome(seconds=words / float(rate.group(1)),
                                 timing="OpenNMT-py's own timer (-report_time): output tokens / its tokens/s",
                                 proc=proc)
        return DecodeOutcome(seconds=float(total.group(1)), timing="OpenNMT-py's own timer (-report_time)",
                             proc=proc)
