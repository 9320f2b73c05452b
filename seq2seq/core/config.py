"""Typed configuration schemas.

The dataclasses below are the single source of defaults and the schema Hydra validates YAML and
command-line overrides against; YAML files under ``configs/`` only set values. Choices are Enums so
that an unknown value fails at composition time with the list of valid ones.

A YAML file holds only what differs from the defaults at its package: a group option
``configs/<group>/<option>.yaml`` against the dataclass at ``<group>`` (``model/attention`` at
``model.attention``; a ``# @package _global_`` option against ``TrainConfig``), a primary config
(``train.yaml``) against its schema, and an experiment (``configs/experiment/``, loaded last)
against the composition without it, under any choice of the other groups. One exception: a group
option may state its defining key, the one naming what the option is, even at its default:
``data: corpus``, ``tokenizer: model_type``, ``model/attention: type``, ``optim: name``,
``search: beam_size``. An option with nothing else to set keeps only its comments (an empty file
composes). ``tests/test_config_defaults.py`` enforces this.

``register_configs()`` must be called explicitly by an entry point (no import-time side effects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class CorpusSource(str, Enum):
    """Where a corpus comes from. ``auto`` tries local files, then the hub."""

    auto = "auto"
    local = "local"
    hub = "hub"
    synthetic = "synthetic"


class SpmModelType(str, Enum):
    unigram = "unigram"
    bpe = "bpe"


class AttentionType(str, Enum):
    none = "none"
    bahdanau = "bahdanau"
    luong = "luong"
    local = "local"  # Luong et al. 2015, 3.2: a window of 2D+1 source positions per step


class PositionBias(str, Enum):
    none = "none"
    # a learned bias per clipped distance to the step's expected source position (local attention:
    # to its window's centre p_t)
    relative = "relative"


class LocalMode(str, Enum):
    monotonic = "monotonic"  # local-m: the window is centred on p_t = t
    predictive = "predictive"  # local-p: p_t = S sigmoid(v_p^T tanh(W_p h_t)), Gaussian sigma = D/2


class LuongScore(str, Enum):
    dot = "dot"
    general = "general"
    concat = "concat"
    scaled_dot = "scaled_dot"  # q.k / sqrt(d) (Vaswani et al. 2017, 3.2.1)


class Normalizer(str, Enum):
    """What turns attention scores into weights."""

    softmax = "softmax"
    sparsemax = "sparsemax"  # Martins & Astudillo 2016: exact zeros
    entmax15 = "entmax15"  # Peters et al. 2019, alpha = 1.5: sparse, smoother than sparsemax


class OptimizerName(str, Enum):
    adam = "adam"
    adamw = "adamw"


class SchedulerName(str, Enum):
    constant = "constant"
    plateau = "plateau"
    warmup_decay = "warmup_decay"
    cosine = "cosine"


class TeacherForcingSchedule(str, Enum):
    constant = "constant"
    linear = "linear"
    inverse_sigmoid = "inverse_sigmoid"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Kernels(str, Enum):
    """What runs the model: ``reference`` (the model modules, what a GPU runs), ``fast`` (the CPU
    kernels), ``auto`` (fast on the CPU, reference elsewhere). See seq2seq/model/engine.py."""

    auto = "auto"
    fast = "fast"
    reference = "reference"


class Precision(str, Enum):
    """``auto``: bf16 autocast on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), else float32."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class SyntheticConfig:
    """The toy language pair (see ``seq2seq/data/synthetic.py``)."""

    seed: int = 13
    train_size: int = 20000
    valid_size: int = 500
    test_size: int = 1000
    min_len: int = 3  # source words
    max_len: int = 80
    num_nouns: int = 120
    num_adjectives: int = 40
    num_verbs: int = 60


@dataclass
class DataConfig:
    corpus: str = MISSING  # name used in logs, reports and cache keys
    # Corpus root; a corpus lives in <root>/<dir or corpus>/<split>.<lang>[.gz].
    root: str = "${oc.env:SEQ2SEQ_DATA,data}"
    dir: str | None = None  # folder under root when it differs from `corpus`
    source: CorpusSource = CorpusSource.auto
    languages: list[str] = field(default_factory=list)  # languages the corpus has
    src_lang: str = MISSING
    tgt_lang: str = MISSING
    train_split: str = "train"
    valid_split: str = "valid"
    test_splits: list[str] = field(default_factory=lambda: ["test"])
    hub_id: str | None = None
    hub_config: str | None = None
    # local split name -> hub split name, for hub datasets that name splits differently
    hub_splits: dict[str, str] = field(default_factory=dict)
    # Tokenizer models and tokenized corpora are cached here (never inside `root`, which may be
    # read-only shared storage).
    cache_dir: str = "${oc.env:SEQ2SEQ_CACHE,data/cache}"
    # Training-split filters (evaluation splits are never filtered).
    max_len: int = 100  # words, either side
    max_len_ratio: float = 3.0  # longer side / shorter side, in words
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TokenizerConfig:
    model_type: SpmModelType = SpmModelType.unigram
    vocab_size: int = 8000
    joint: bool = True  # one model for both languages; false trains one per language
    character_coverage: float = 0.9995
    byte_fallback: bool = True  # rare characters become bytes, so decoding is lossless
    input_sentence_size: int = 2_000_000  # lines sampled for training the model


@dataclass
class AttentionConfig:
    type: AttentionType = AttentionType.bahdanau
    score: LuongScore = LuongScore.general  # luong only
    input_feeding: bool = True  # luong only (Luong et al. 2015, section 3.3)
    hidden_size: int = 512  # size of the additive (bahdanau / concat) scoring layer
    heads: int = 1  # heads over split projections (multi-head attention over the encoder states)
    normalizer: Normalizer = Normalizer.softmax
    mode: LocalMode = LocalMode.monotonic  # local only
    window: int = 10  # local only: D, the window is [p_t - D, p_t + D]
    coverage: bool = False  # the sum of past attention as a scoring input (additive scores; Tu et al. 2016)
    position_bias: PositionBias = PositionBias.none
    max_distance: int = 16  # relative position bias: distances beyond +-max_distance share a bias


@dataclass
class ModelConfig:
    embedding_size: int = 256
    encoder_hidden_size: int = 256  # per direction
    encoder_layers: int = 1
    decoder_hidden_size: int = 512
    decoder_layers: int = 1
    dropout: float = 0.2
    tie_embeddings: bool = False  # decoder input and output embeddings
    # the decoder also attends over its own earlier LSTM outputs (causal; attention.DecoderSelfAttention)
    decoder_self_attention: bool = False
    attention: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    clip_norm: float = 5.0
    scheduler: SchedulerName = SchedulerName.plateau
    plateau_factor: float = 0.5  # plateau: lr multiplier after `plateau_patience` bad validations
    plateau_patience: int = 2
    # warmup_decay: linear warmup, then inverse square root decay; cosine: linear warmup, then a
    # cosine from lr down to min_lr at the end of the budget (trainer.max_steps, max_epochs or
    # max_minutes, whichever is spent first)
    warmup_steps: int = 1000
    min_lr: float = 1e-5


@dataclass
class TrainerConfig:
    max_steps: int | None = None
    max_epochs: int | None = 20
    # A budget in wall-clock minutes of training (validations included, summed over resumes):
    # training stops at the first update past it, and the cosine schedule decays over it. Unlike
    # steps and epochs it depends on the machine, so two runs of it need not stop at the same step.
    max_minutes: float | None = None
    device: Device = Device.auto
    kernels: Kernels = Kernels.auto
    precision: Precision = Precision.auto
    num_threads: int = 0  # CPU threads; 0 uses every core
    max_tokens: int = 4096  # per batch, padding included: sentences x longest side
    max_sentences: int = 256
    valid_every: int = 500  # steps between validations (and the final state is always validated)
    # Also validate when an epoch ends (as fairseq does), so the plateau schedule and early
    # stopping see every epoch; off by default: on a big corpus an epoch is far apart from valid_every.
    valid_each_epoch: bool = False
    log_every: int = 50
    patience: int = 10  # validations without a better valid BLEU before stopping; 0 = never
    valid_max_sentences: int | None = None  # cap on the sentences decoded for valid BLEU
    label_smoothing: float = 0.0
    coverage_loss: float = 0.0  # lambda of the coverage penalty sum_j min(a_tj, c_tj) (See et al. 2017)
    # The update from which the penalty counts. See et al. added it only after the model had
    # learned to attend; from the first update it pins the attention to a content-free spread
    # before the model knows where to look (the zoo's coverage arm: valid BLEU 0.05 at 2,000 updates).
    coverage_loss_start: int = 0
    teacher_forcing: float = 1.0  # probability of feeding the gold token (start value)
    teacher_forcing_schedule: TeacherForcingSchedule = TeacherForcingSchedule.constant
    teacher_forcing_min: float = 0.0  # floor for the decaying schedules
    teacher_forcing_decay_steps: int = 10000  # linear: steps to reach the floor
    teacher_forcing_k: float = 1000.0  # inverse_sigmoid: k / (k + exp(step / k))
    sample_translations: int = 3  # shown in TensorBoard at each validation
    progress: bool = True
    resume: str | None = None  # run directory to continue
    max_nonfinite_steps: int = 20  # consecutive skipped (NaN/inf) updates before the run stops
    max_oom_steps: int = 20  # consecutive batches skipped for running out of memory before the run stops
    save_every: int | None = None  # steps between checkpoints besides those at each validation
    keep_checkpoints: int = 3  # newest checkpoints/step-<N>.pt files kept; last.pt/best.pt link to them
    # step files with the best valid BLEU also kept (for seq2seq-average best=N)
    keep_best_checkpoints: int = 1
    evaluate_at_end: bool = True  # evaluate `best` on the test splits when training ends


@dataclass
class SearchConfig:
    beam_size: int = 1  # 1 is greedy decoding
    length_penalty: float = 1.0  # alpha in ((5 + len) / 6) ** alpha (Wu et al. 2016)
    max_len_ratio: float = 2.0  # hypothesis length cap: ratio * source tokens + offset
    max_len_offset: int = 10
    batch_size: int = 64  # sentences decoded together
    # beam search: the K best finished hypotheses with their scores (seq2seq-translate prints them);
    # a sentence then ends once K have finished, not with the first
    nbest: int = 1


@dataclass
class EvalConfig:
    # Source-length bucket edges in words: [1, 11, ...] means 1-10, 11-20, ..., last edge and up.
    bucket_edges: list[int] = field(default_factory=lambda: [1, 11, 21, 31, 41, 51, 61])
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 12345
    heatmaps: int = 4  # attention heatmaps for the first N test sentences


@dataclass
class TrainConfig:
    name: str = "default"
    seed: int = 1234
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class CheckpointChoice(str, Enum):
    best = "best"
    last = "last"
    averaged = "averaged"  # written by seq2seq-average


@dataclass
class EvaluateConfig:
    run_dir: str = MISSING  # a training run directory, outputs/<name>/<timestamp>
    checkpoint: CheckpointChoice = CheckpointChoice.best
    split: str | None = None  # a split of the run's corpus; default: its test splits
    src_file: str | None = None  # or any source/reference pair of files
    ref_file: str | None = None
    name: str | None = None  # report folder name for a file pair (default: the file's stem)
    align_file: str | None = None  # gold word alignments (Pharaoh i-j, a line per sentence): AER
    ensemble: list[str] = field(default_factory=list)  # more run directories decoding with run_dir (same tokenizer)
    data_root: str | None = None  # where the run's corpus is now, if it moved
    device: Device = Device.auto
    kernels: Kernels = Kernels.auto
    num_threads: int = 0  # CPU threads; 0 uses every core (set it when a training shares the machine)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class TranslateConfig:
    run_dir: str = MISSING
    checkpoint: CheckpointChoice = CheckpointChoice.best
    device: Device = Device.auto
    kernels: Kernels = Kernels.auto
    num_threads: int = 0  # CPU threads; 0 uses every core
    search: SearchConfig = field(default_factory=SearchConfig)
    alignments: bool = False  # also print each translation's word alignment (tab, Pharaoh i-j)
    ensemble: list[str] = field(default_factory=list)  # more run directories decoding with run_dir (same tokenizer)


@dataclass
class AverageConfig:
    run_dir: str = MISSING
    last: int | None = None  # average the N newest checkpoints (trainer.keep_checkpoints >= N)
    best: int | None = None  # or the N with the best valid BLEU (trainer.keep_best_checkpoints >= N)
    overwrite: bool = False  # replace an existing checkpoints/averaged.pt


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore. Call once from an entry point."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="translate_schema", node=TranslateConfig)
    cs.store(name="average_schema", node=AverageConfig)


def enum_choices(enum_type: type[Enum]) -> list[str]:
    return [m.name for m in enum_type]


def as_plain_dict(cfg: Any) -> dict:
    """A resolved config as plain Python containers, safe for JSON and ``weights_only`` loads."""
    from omegaconf import OmegaConf

    node = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def from_plain_dict(data: dict) -> TrainConfig:
    """Rebuild a typed config from ``as_plain_dict`` output (e.g. stored in a checkpoint)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), data)
    return OmegaConf.to_object(merged)
