"""The training loop (``trainer``) and the optimizer with its learning-rate schedules (``optim``).
Imports every layer below it, ``evaluation`` included (validation BLEU)."""
