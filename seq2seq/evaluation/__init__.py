"""Scores and reports: sacreBLEU, BLEU by length with bootstrap intervals (``metrics``), evaluating
a run (``evaluate``), report files and plots (``report``), and comparing runs (``compare*``).
Imports ``core``, ``data``, ``model`` and ``search``; never ``training``."""
