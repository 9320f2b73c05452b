"""Run ``seq2seq-train`` and SIGKILL the process at a chosen point (used by test_reliability.py).

    python tests/kill_during.py KIND STEP [seq2seq-train overrides...]

KIND is where the kill lands once ``STEP`` updates are done:
- ``step``: inside the next update, after its forward pass and before the optimizer step;
- ``valid``: inside the validation at ``STEP``, while it decodes;
- ``save``: inside the checkpoint write at ``STEP``, after the temp file is written, before the rename.

The kill is a real SIGKILL of this process: nothing gets to clean up, as after an OOM kill or a
power cut. The patches only choose the moment; the code that runs is the installed seq2seq.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    kind, at = sys.argv[1], int(sys.argv[2])
    import seq2seq.core.checkpoint
    import seq2seq.training.trainer
    from seq2seq import cli

    state = {"trainer": None}

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def step() -> int:
        trainer = state["trainer"]
        return -1 if trainer is None else trainer.progress.step

    original_init = seq2seq.training.trainer.Trainer.__init__

    def init(self, *args, **kwargs):  # remember the trainer so the patches can read its step
        original_init(self, *args, **kwargs)
        state["trainer"] = self

    seq2seq.training.trainer.Trainer.__init__ = init

    if kind == "step":
        original_loss = seq2seq.training.trainer.Trainer._loss

        def loss(self, batch, teacher_forcing):
            value = original_loss(self, batch, teacher_forcing)
            if step() == at:
                die()
            return value

        seq2seq.training.trainer.Trainer._loss = loss
    elif kind == "valid":
        original_translate = seq2seq.training.trainer.translate_ids

        def translate(*args, **kwargs):
            if step() == at:
                die()
            return original_translate(*args, **kwargs)

        seq2seq.training.trainer.translate_ids = translate
    elif kind == "save":
        original_replace = seq2seq.core.checkpoint.os.replace

        def replace(src, dst):
            if step() == at and str(src).endswith(".tmp"):
                die()
            return original_replace(src, dst)

        seq2seq.core.checkpoint.os.replace = replace
    else:
        raise SystemExit(f"unknown kill point {kind!r}")
    sys.argv = ["seq2seq-train", *sys.argv[3:]]
    cli.train()


if __name__ == "__main__":
    main()
