"""Command-line entry points: seq2seq-train, seq2seq-evaluate, seq2seq-translate.

Thin by design: compose the config (with one-line errors for typos and unknown choices), then call
``pipeline``. ``seq2seq-train`` runs through ``@hydra.main`` so that Hydra's run directories and
multirun sweeps work; the overrides are checked first by composing them here, because Hydra's own
messages span several lines and do not list the valid keys.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seq2seq.core.config import (
    AverageConfig,
    EvaluateConfig,
    TrainConfig,
    TranslateConfig,
    register_configs,
)
from seq2seq.core.errors import ConfigError, RunDirError, Seq2SeqError
from seq2seq.core.files import make_writable_dir

if TYPE_CHECKING:  # torch is imported only by the commands that need it, after the config checks
    from seq2seq.training.distributed import Dist, LaunchEnv

log = logging.getLogger("seq2seq")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _debug() -> bool:
    return os.environ.get("SEQ2SEQ_DEBUG", "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(err: BaseException, code: int = 2) -> NoReturn:
    """Report a user error as one line on stderr and exit; traceback only when debugging."""
    if _debug():
        raise err
    print(f"error: {err}", file=sys.stderr, flush=True)
    _tell_torchrun(f"error: {err}")
    # Leaving now: a SIGTERM (torchrun stopping the other ranks) must not turn the exit into a
    # KeyboardInterrupt traceback from an atexit handler.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def _tell_torchrun(line: str) -> None:
    """Under torchrun, leave the error line where its failure report looks for it (the report
    then shows it instead of "To enable traceback see ...")."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                   "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # the report is torchrun's; our line is already on stderr


# ----------------------------------------------------------------------------- composing


def _valid_keys(config_name: str, parent: str) -> list[str]:
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        base = compose(config_name)
    node = OmegaConf.select(base, parent) if parent else base
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def explain(err: Exception, config_name: str) -> str:
    """One line for a Hydra/OmegaConf composition error, naming the key and the valid choices."""
    chain, cur = [], err
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if isinstance(err, MissingConfigException):
        text = str(err)
        missing = re.search(r"Could not find '([^']+)'", text)
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        if missing:
            group, _, choice = missing.group(1).rpartition("/")
            return (f"unknown choice '{choice}' for config group '{group}'; choose one of: "
                    f"{', '.join(options) or '(none)'}")
        return text.splitlines()[0]
    for e in chain:
        full_key = getattr(e, "full_key", None)
        if not full_key or not isinstance(e, OmegaConfBaseException):
            continue
        message = str(e).splitlines()[0]
        if "missing mandatory value" in message.lower():
            return f"'{full_key}' is required; add {full_key}=... to the command line"
        if "not in" in message:  # an unknown key
            parent, _, key = full_key.rpartition(".")
            valid = _valid_keys(config_name, parent)
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean '{f'{parent}.' if parent else ''}{close[0]}'?)" if close else ""
            return f"unknown config key '{full_key}'{hint}; valid keys{f' in {parent}' if parent else ''}: {', '.join(valid)}"
        choices = re.search(r"expected one of \[([^\]]*)\]", message)
        if choices:
            value = re.search(r"Invalid value '([^']*)'", message)
            return (f"invalid value {value.group(1)!r} for '{full_key}'; choose one of: {choices.group(1)}"
                    if value else f"invalid value for '{full_key}'; choose one of: {choices.group(1)}")
        return f"invalid value for '{full_key}': {message}"
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"bad override: {first}"


def _override_sets(overrides: list[str]) -> list[list[str]]:
    """Override lists to check: with sweeps (a,b,c) each value once, not the whole product."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    base, sweeps = [], []
    for o in parsed:
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            base.append(f"{o.get_key_element()}={values[0]}")
            sweeps.append((len(base) - 1, o.get_key_element(), values[1:]))
        else:
            base.append(o.input_line)
    sets = [base]
    for pos, key, values in sweeps:
        for v in values:
            sets.append([*base[:pos], f"{key}={v}", *base[pos + 1:]])
    return sets


def compose_checked(config_name: str, overrides: list[str],
                    check: Callable[[object], None] | None = None) -> DictConfig:
    """Compose like Hydra does, turning every composition error into a one-line ``ConfigError``.
    ``check`` sees each composed config (each job's, for a sweep) as its typed object."""
    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        sets = _override_sets(user)
        cfg = None
        for ov in sets:
            with initialize_config_dir(str(CONFIG_DIR), version_base=None):
                composed = compose(config_name, overrides=ov)
            typed = OmegaConf.to_object(composed)  # resolves interpolations and checks every value
            if check is not None:
                check(typed)
            cfg = cfg or composed
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        if _debug():
            raise
        raise ConfigError(explain(err, config_name)) from None
    return cfg


# ----------------------------------------------------------------------------- seq2seq-train


def _resume_args(args: list[str]) -> list[str]:
    """``trainer.resume=DIR`` reuses DIR's own overrides and directory; later arguments win."""
    resume = [a for a in args if a.startswith("trainer.resume=")]
    if not resume:
        return args
    run_dir = Path(resume[-1].split("=", 1)[1])
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise ConfigError(f"trainer.resume={run_dir}: no {saved} there; pass the directory of an earlier run")
    previous = [o for o in OmegaConf.load(saved) if not str(o).startswith("trainer.resume=")]
    return [*map(str, previous), *args, f"hydra.run.dir={run_dir}"]


def _refuse_used_run_dir(args: list[str]) -> None:
    """A new run aimed (``hydra.run.dir=DIR``, or a sweep's ``hydra.sweep.dir=DIR``) at a directory
    that already holds a run, or a part of one, is refused here: before Hydra writes DIR/.hydra/
    (which would replace the overrides a resume needs) and before anything else is written."""
    from seq2seq.core.runlock import run_markers

    if any(a.startswith("trainer.resume=") for a in args):
        return
    for a in args:
        key, _, value = a.lstrip("+").partition("=")
        if key == "hydra.run.dir" and not _multirun(args):
            found = run_markers(Path(value))
            if found:
                raise RunDirError(f"{value} already holds a run ({', '.join(found)}); resume it with "
                                  f"trainer.resume={value} or choose a new directory")
        elif key == "hydra.sweep.dir" and _multirun(args) and Path(value).is_dir():
            for job in sorted(p for p in Path(value).iterdir() if p.is_dir()):
                found = run_markers(job)
                if found:
                    raise RunDirError(f"the sweep directory {value} already holds runs ({job}: {', '.join(found)}); "
                                      "choose a new hydra.sweep.dir")


def _make_run_dir_parent(args: list[str], name: str) -> None:
    """Create the folder Hydra will create the run directory in (``hydra.run.dir``, or
    ``outputs/<name>``), so a place that cannot hold one (a read-only parent, a path through a
    file, /proc) gets one line here instead of a traceback from Hydra."""
    target = Path("outputs") / name
    for a in args:
        key, _, value = a.lstrip("+").partition("=")
        if key == ("hydra.sweep.dir" if _multirun(args) else "hydra.run.dir"):
            target = Path(value)
    try:
        make_writable_dir(target)
    except OSError as err:
        raise RunDirError(f"cannot create a run directory in {target} ({err.strerror}); choose another with "
                          "hydra.run.dir=DIR (or name=...) in a writable place") from None


def _multirun(args: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in args)


def _lock_named_run_dir(args: list[str]) -> None:
    """Lock the run directory named on the command line (a resume's, or ``hydra.run.dir``) before
    Hydra writes into it, so a second trainer there stops before touching anything."""
    from seq2seq.core.runlock import lock_run_dir

    if _multirun(args):
        return
    for a in reversed(args):
        key, _, value = a.lstrip("+").partition("=")
        if key == "hydra.run.dir":
            if Path(value).is_dir():
                lock_run_dir(Path(value))
            return


# the sweep jobs that failed, "<run dir>: <error>", for the summary line at the sweep's end
_failed_jobs: list[str] = []
# rank 0's process group under torchrun, joined before Hydra runs the task (see _train_ranks)
_rank0_dist: Dist | None = None


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _train_task(dcfg: DictConfig) -> float | None:
    from seq2seq.pipeline import run_training

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    dist = _rank0_dist
    try:
        cfg: TrainConfig = OmegaConf.to_object(dcfg)
        if dist is None:
            dist = _join_submitit_job(cfg)
        result = run_training(cfg, run_dir, dist)
        reports = result.reports
        print_reports(reports)
        if result.stopped and _in_process_sweep():
            _end_stopped_sweep(run_dir)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside the training loop (which saves and stops)
        if dist is not None and not dist.is_primary:
            sys.exit(130)
        fail(Seq2SeqError(f"interrupted in {run_dir} outside the training loop (data preparation, set-up or the "
                          "final evaluation); what was saved there stays; run the command again, or resume "
                          "with trainer.resume=DIR if it has a checkpoint"), 130)
    except Seq2SeqError as err:
        if dist is not None and dist.distributed:
            _rank_fail(err, dist.rank)
        # One bad job must not end a sweep that runs its jobs in this process; a submitit job is a
        # process (or SLURM job) of its own, which ends with the error for the launcher to report.
        if _in_process_sweep():
            log.error("%s: %s", run_dir, err)
            _failed_jobs.append(f"{run_dir}: {err}")
            return None
        fail(err, err.exit_code)
    finally:
        if dist is not None:
            dist.close()
    return reports[0][0].score.bleu if reports else None


def _in_process_sweep() -> bool:
    """A ``-m`` sweep whose jobs run one after another in this process (Hydra's basic launcher)."""
    return HydraConfig.get().mode == RunMode.MULTIRUN and "SUBMITIT_EXECUTOR" not in os.environ


def _end_stopped_sweep(run_dir: Path) -> None:
    """Ctrl-C or SIGTERM stops the whole sweep, not only the job that was training: the basic
    launcher would otherwise go on to the next job, and a user would have to stop every job in
    turn. The stopped job is saved like a single run (exit status 0); earlier failed jobs still
    make it 1. SystemExit, not an exception, because Hydra's job runner catches Exception."""
    log.warning("sweep stopped with the job in %s; the jobs after it were not started (run them with the "
                "same command and only their values, and resume this one with trainer.resume=%s)", run_dir, run_dir)
    if _failed_jobs:
        fail(Seq2SeqError(f"{len(_failed_jobs)} sweep job(s) failed: " + "; ".join(_failed_jobs)), 1)
    sys.exit(0)


def _join_submitit_job(cfg: TrainConfig) -> Dist | None:
    """In a job of Hydra's submitit launcher with several tasks (``tasks_per_node``, ``nodes``),
    each task runs this function: join them as the ranks of one data-parallel run."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return None
    import submitit

    from seq2seq.model.devices import resolve_device
    from seq2seq.training.distributed import (
        init_process_group,
        launch_env,
        rank_device,
        submitit_to_torch_env,
    )

    job = submitit.JobEnvironment()
    os.environ.update(submitit_to_torch_env(os.environ, job.global_rank, job.local_rank, job.num_tasks,
                                            job.num_nodes, job.hostnames, str(job.job_id)))
    env = launch_env()
    if env is None:
        return None
    if env.rank:  # Hydra set up each task's logging; rank 0 alone writes the run's log file
        _quiet_rank_logging(env.rank)
    return init_process_group(env, rank_device(resolve_device(cfg.trainer.device), env.local_rank))


def _quiet_rank_logging(rank: int) -> None:
    """A rank other than 0 logs warnings and errors to stderr only, each line marked with its rank."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def _rank_fail(err: Seq2SeqError, rank: int) -> NoReturn:
    """End one rank of a data-parallel run: rank 0 says what went wrong; another rank says it
    only when rank 0 cannot know (its own failure, or a lost peer)."""
    from seq2seq.training.distributed import ReportedByPrimary

    if rank == 0 or _debug():
        fail(err, err.exit_code)
    if not isinstance(err, ReportedByPrimary):
        print(f"error: [rank {rank}] {err}", file=sys.stderr, flush=True)
        _tell_torchrun(f"error: [rank {rank}] {err}")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(err.exit_code)


def print_reports(reports: list) -> None:
    """The per-bucket summary of each evaluation, on stdout (the commands' own output)."""
    from seq2seq.evaluation.report import format_summary

    for report, out_dir in reports:
        print(format_summary(report), flush=True)
        print(f"report: {out_dir}\n", flush=True)


def _sigterm_interrupts(signum: int, _frame: object) -> None:
    """SIGTERM outside the training loop (whose own handler saves first) ends the command as Ctrl-C
    does: one line, not a bare exit status 143."""
    raise KeyboardInterrupt


def train() -> None:
    register_configs()
    signal.signal(signal.SIGTERM, _sigterm_interrupts)
    args = sys.argv[1:]
    from seq2seq.training.distributed import launch_env

    try:
        env = launch_env()
    except Seq2SeqError as err:
        fail(err, err.exit_code)
    if env is not None:
        _train_ranks(args, env)
        return
    try:
        args = _resume_args(args)
        _refuse_used_run_dir(args)
        from seq2seq.pipeline import check_train_config

        cfg = compose_checked("train", [a for a in args if not a.startswith("-")], check_train_config)
        _make_run_dir_parent(args, str(cfg.name))
        _lock_named_run_dir(args)
    except Seq2SeqError as err:
        fail(err, err.exit_code)
    except KeyboardInterrupt:
        fail(Seq2SeqError("interrupted before anything was written"), 130)
    sys.argv = [sys.argv[0], *args]
    _train_task()
    if _failed_jobs:  # a sweep ran to its end with failed jobs: say which, exit non-zero
        fail(Seq2SeqError(f"{len(_failed_jobs)} sweep job(s) failed: " + "; ".join(_failed_jobs)), 1)


def _resolved_run_dir(args: list[str], cfg_overrides: list[str]) -> Path:
    """The run directory Hydra will use, with ``${now:...}`` resolved once (by rank 0), so every
    rank of a torchrun job writes to (and rank 0 alone creates) the same directory."""
    for a in reversed(args):
        key, _, value = a.lstrip("+").partition("=")
        if key == "hydra.run.dir":
            return Path(value)
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        composed = compose("train", overrides=cfg_overrides, return_hydra_config=True)
    try:
        return Path(str(OmegaConf.select(composed, "hydra.run.dir", throw_on_resolution_failure=True)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve hydra.run.dir outside Hydra ({str(err).splitlines()[0]}); under torchrun "
                          "give the run directory as hydra.run.dir=DIR") from None


def _train_ranks(args: list[str], env: LaunchEnv) -> None:
    """seq2seq-train as one rank of a torchrun job. Every rank checks the config (the same for
    all; only rank 0 says what is wrong) before joining the others; rank 0 alone checks, locks and
    creates the run directory and runs through Hydra (its ``.hydra``, ``train.log``); the other
    ranks train with the same config and write nothing there."""
    global _rank0_dist
    from seq2seq.model.devices import resolve_device
    from seq2seq.pipeline import check_train_config, run_training
    from seq2seq.training.distributed import init_process_group, rank_device

    primary = env.rank == 0
    if not primary:
        _quiet_rank_logging(env.rank)
    try:
        if _multirun(args):
            raise ConfigError("a sweep (-m) cannot run under torchrun, which starts the ranks of one run; run the "
                              "sweep with hydra/launcher=slurm_ddp (each job a data-parallel run) or its "
                              "jobs one by one")
        args = _resume_args(args)
        overrides = [a for a in args if not a.startswith("-")]
        dcfg = compose_checked("train", overrides, check_train_config)
        cfg: TrainConfig = OmegaConf.to_object(dcfg)
        device = rank_device(resolve_device(cfg.trainer.device), env.local_rank)
    except Seq2SeqError as err:  # the same on every rank: said once
        if primary:
            fail(err, err.exit_code)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if primary:
            fail(Seq2SeqError("interrupted before anything was written"), 130)
        sys.exit(130)
    dist = None
    try:
        dist = init_process_group(env, device)

        def claim() -> str:
            _refuse_used_run_dir(args)
            _make_run_dir_parent(args, str(cfg.name))
            run_dir = _resolved_run_dir(args, [o for o in overrides if not o.lstrip("+~").startswith("hydra")])
            make_writable_dir(run_dir)
            from seq2seq.core.runlock import lock_run_dir

            lock_run_dir(run_dir)
            return str(run_dir)

        run_dir = dist.on_primary("choosing the run directory", claim)
        if primary:
            _rank0_dist = dist
            sys.argv = [sys.argv[0], *args, f"hydra.run.dir={run_dir}"]
            _train_task()  # closes the process group
            return
        run_training(cfg, Path(run_dir), dist)
    except Seq2SeqError as err:
        _rank_fail(err, env.rank)
    except OSError as err:
        _rank_fail(RunDirError(f"cannot create the run directory ({err.strerror}: {err.filename}); choose another "
                               "with hydra.run.dir=DIR"), env.rank)
    except KeyboardInterrupt:
        if primary:
            fail(Seq2SeqError("interrupted outside the training loop; what was saved stays; run the command "
                              "again, or resume with trainer.resume=DIR if it has a checkpoint"), 130)
        sys.exit(130)
    finally:
        if dist is not None:
            dist.close()


# ----------------------------------------------------------------------------- evaluate / translate


def _simple_command(config_name: str, run: Callable[[DictConfig], int | None]) -> None:
    register_configs()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        stream=sys.stderr)
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(Path(CONFIG_DIR / f"{config_name}.yaml").read_text().split("defaults")[0].replace("# ", ""))
        sys.exit(0)
    try:
        cfg = compose_checked(config_name, args)
        if OmegaConf.is_missing(cfg, "run_dir"):
            raise ConfigError(f"run_dir is required: seq2seq-{config_name} run_dir=outputs/<name>/<timestamp>")
        code = run(cfg)
    except Seq2SeqError as err:
        fail(err, err.exit_code)
    sys.exit(code or 0)


def evaluate() -> None:
    def run(dcfg: DictConfig) -> int:
        from seq2seq.pipeline import run_evaluate

        cfg: EvaluateConfig = OmegaConf.to_object(dcfg)
        print_reports(run_evaluate(cfg))
        return 0

    _simple_command("evaluate", run)


def translate() -> None:
    def run(dcfg: DictConfig) -> int:
        from seq2seq.pipeline import run_translate

        logging.getLogger().setLevel(logging.WARNING)  # stdout carries the translations
        cfg: TranslateConfig = OmegaConf.to_object(dcfg)
        run_translate(cfg, sys.stdin, sys.stdout)
        return 0

    _simple_command("translate", run)


def average() -> None:
    def run(dcfg: DictConfig) -> int:
        from seq2seq.training.average import average_checkpoints

        cfg: AverageConfig = OmegaConf.to_object(dcfg)
        print(average_checkpoints(cfg))
        return 0

    _simple_command("average", run)


# ----------------------------------------------------------------------------- seq2seq-compare


def compare() -> None:
    """seq2seq-compare: one table of configs over seeds, with paired bootstrap against a baseline."""
    import argparse

    from seq2seq.evaluation.compare import run_compare

    parser = argparse.ArgumentParser(
        prog="seq2seq-compare",
        description="Compare finished training runs: mean ± std over seeds per config, BLEU by length, "
                    "paired bootstrap against a baseline. Writes comparison.{md,csv,json} and two plots.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="DIR",
                        help="a multirun sweep directory, or one or more run directories")
    parser.add_argument("--out", type=Path, help="output folder (default: the sweep directory; "
                        "required for several run directories)")
    parser.add_argument("--baseline", help="config label to test against (default: none if present, else the first)")
    parser.add_argument("--split", help="evaluation split (default: the corpus' first test split)")
    parser.add_argument("--search", default="greedy", help="search setting of the reports: greedy, beam5, beam5-lp0.6, ...; add -averaged, -last or -ensemble<N> for those reports (beam5-averaged)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples; 0 skips it")
    parser.add_argument("--seed", type=int, default=12345, help="paired bootstrap seed")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="also use unfinished runs that have an eval report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        _, _, table = run_compare(args.paths, args.out, split=args.split, search=args.search,
                                  baseline=args.baseline, n_boot=args.bootstrap, seed=args.seed,
                                  include_unfinished=args.include_unfinished)
    except Seq2SeqError as err:
        fail(err, err.exit_code)
    print(table, end="", flush=True)
