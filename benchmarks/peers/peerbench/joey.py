"""Joey NMT 2.3.0: YAML configs for the matched model, its training log, its own decode timer.

Joey's recurrent decoder always attends with the *current* decoder state; ``attention: bahdanau``
gives the additive (MLP) score and ``luong`` the general (bilinear) one. With input feeding its
LSTM input is [embedding; previous attentional vector] (256 + 512), the same size as our
Bahdanau decoder's [embedding; context], so both attention variants use input feeding here.
The learning rate stays constant through ``scheduling: exponential`` with ``decrease_factor: 1.0``
(Joey needs a scheduler, and its ``plateau`` one fails on torch 2.13).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from peerbench import matched
from peerbench.envs import JOEY, ensure_env, package_versions, venv_python
from peerbench.procs import (
    BenchError,
    ProcResult,
    StepPoint,
    check_ok,
    child_env,
    log_time,
    run_logged,
)
from peerbench.toolkit import (
    CorpusFiles,
    DecodeOutcome,
    DecodeSpec,
    Toolkit,
    TrainOutcome,
    TrainSpec,
    Workspace,
)

STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - INFO - joeynmt\.training - Epoch\s+\d+, "
                       r"Step:\s+(\d+), .*Tokens per Sec:\s+([\d.]+),")
PARAMS_LINE = re.compile(r"Total params: (\d+)")
GENERATION_LINE = re.compile(r"Generation took ([\d.]+)\[sec\]")


def _lang(corpus: CorpusFiles, lang: str) -> dict:
    # level "word": the files are already segmented, so Joey only splits on spaces
    return {"lang": lang, "level": "word", "lowercase": False, "normalize": False, "max_length": -1,
            "voc_file": str(corpus.vocab)}


def model_config(attention: str) -> dict:
    def embeddings() -> dict:
        return {"embedding_dim": matched.EMBEDDING_SIZE, "dropout": matched.DROPOUT}

    return {
        "tied_embeddings": False,
        "tied_softmax": False,
        "encoder": {"type": "recurrent", "rnn_type": "lstm", "embeddings": embeddings(),
                    "hidden_size": matched.ENCODER_HIDDEN_SIZE, "bidirectional": True,
                    "dropout": matched.DROPOUT, "num_layers": matched.LAYERS},
        "decoder": {"type": "recurrent", "rnn_type": "lstm", "embeddings": embeddings(),
                    "hidden_size": matched.DECODER_HIDDEN_SIZE, "dropout": matched.DROPOUT,
                    "hidden_dropout": matched.DROPOUT, "num_layers": matched.LAYERS,
                    "input_feeding": True, "init_hidden": "bridge", "attention": attention},
    }


def train_config(spec: TrainSpec) -> dict:
    corpus = spec.corpus
    if spec.batching == "tokens":
        batch = {"batch_type": "token", "batch_size": spec.max_tokens}
    else:
        batch = {"batch_type": "sentence", "batch_size": spec.batch_sentences}
    return {
        "name": f"bench-{spec.attention}",
        "model_dir": str(spec.run_dir / "model"),
        "use_cuda": False,
        "fp16": False,
        "num_workers": 0,
        "random_seed": spec.seed,
        "data": {"train": str(corpus.train), "dev": str(corpus.valid), "dataset_type": "plain",
                 "src": _lang(corpus, corpus.src_lang), "trg": _lang(corpus, corpus.tgt_lang)},
        "training": {
            "optimizer": "adam", "adam_betas": [0.9, 0.999], "learning_rate": matched.LEARNING_RATE,
            "learning_rate_min": 1.0e-8, "weight_decay": 0.0, "clip_grad_norm": matched.CLIP_NORM,
            "scheduling": "exponential", "decrease_factor": 1.0,
            "loss": "crossentropy", "label_smoothing": 0.0, "normalization": "tokens",
            **batch, "batch_multiplier": 1, "shuffle": True,
            "epochs": 100000, "updates": spec.steps,
            # a log line per update; validation never comes (its interval is past the budget)
            "logging_freq": 1, "validation_freq": spec.steps + 1,
            "early_stopping_metric": "ppl", "keep_best_ckpts": 1, "print_valid_sents": [], "overwrite": True,
        },
        "testing": {"batch_size": matched.DECODE_BATCH_SENTENCES, "batch_type": "sentence", "beam_size": 1,
                    "eval_metrics": []},
        "model": model_config(spec.attention),
    }


def parse_train_log(text: str) -> tuple[list[StepPoint], int | None]:
    """Update points from Joey's per-update log lines. Joey logs the tokens/s of the window since
    its previous line, so a window's tokens are that rate times the time between the lines."""
    points: list[StepPoint] = []
    previous: float | None = None
    for line in text.splitlines():
        m = STEP_LINE.match(line)
        if not m:
            continue
        t = log_time(m.group(1))
        tokens = float(m.group(3)) * (t - previous) if previous is not None else 0.0
        points.append(StepPoint(step=int(m.group(2)), time=t, tokens=tokens))
        previous = t
    params = PARAMS_LINE.search(text)
    return points, int(params.group(1)) if params else None


class Joey(Toolkit):
    name = "joey"
    label = "Joey NMT"

    def __init__(self, work: Workspace) -> None:
        super().__init__(work)
        self.python = venv_python(work.venvs, JOEY)

    def setup(self, log: Path) -> None:
        self.python = ensure_env(self.work.venvs, JOEY, log)

    def versions(self) -> dict[str, str]:
        return package_versions(self.python, (JOEY.dist,))

    def _run(self, config: dict, config_path: Path, args: list[str], log: Path, threads: int) -> ProcResult:
        """Write ``config`` and run ``python -m joeynmt <mode> <config> <options>``."""
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return run_logged([str(self.python), "-m", "joeynmt", *args[:1], str(config_path), *args[1:]], log,
                          child_env(threads))

    def train(self, spec: TrainSpec) -> TrainOutcome:
        config = train_config(spec)
        # the config lives outside model_dir: Joey empties model_dir before copying the config in
        proc = self._run(config, spec.run_dir / "joey-train.yaml", ["train", "--skip-test"], spec.log, spec.threads)
        check_ok(proc, "training", spec.log)
        points, params = parse_train_log(spec.log.read_text(encoding="utf-8", errors="replace"))
        checkpoint = Path(config["model_dir"]) / f"{spec.steps}.ckpt"
        if not checkpoint.is_file():
            raise BenchError(f"training ended without {checkpoint.name}; log: {spec.log}")
        return TrainOutcome(points=points, params=params, proc=proc, model=checkpoint,
                            info={"config": str(spec.run_dir / "joey-train.yaml")})

    def decode(self, spec: DecodeSpec) -> DecodeOutcome:
        config = yaml.safe_load((spec.model.parent.parent / "joey-train.yaml").read_text(encoding="utf-8"))
        corpus = spec.corpus
        config["data"] = {"test": str(corpus.test), "dataset_type": "plain",
                          "src": _lang(corpus, corpus.src_lang), "trg": _lang(corpus, corpus.tgt_lang)}
        config["testing"] = {"load_model": str(spec.model), "batch_size": matched.DECODE_BATCH_SENTENCES,
                             "batch_type": "sentence", "beam_size": spec.beam,
                             "beam_alpha": matched.LENGTH_PENALTY_ALPHA if spec.beam > 1 else -1,
                             "n_best": 1, "eval_metrics": [], "return_prob": "none"}
        prefix = spec.out.with_suffix("")  # Joey writes <prefix>.test
        proc = self._run(config, spec.out.with_suffix(".yaml"), ["test", "--output-path", str(prefix)],
                         spec.log, spec.threads)
        check_ok(proc, "decoding", spec.log)
        took = GENERATION_LINE.search(spec.log.read_text(encoding="utf-8", errors="replace"))
        written = prefix.with_name(prefix.name + ".test")
        if took is None or not written.is_file():
            raise BenchError(f"decoding wrote no timing or no {written.name}; log: {spec.log}")
        written.replace(spec.out)
        return DecodeOutcome(seconds=float(took.group(1)), timing="Joey's own 'Generation took' timer",
                             proc=proc)
