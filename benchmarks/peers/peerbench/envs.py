"""One virtual environment per peer toolkit, installed from the package registry, reused when ready.

torch is installed first and pinned by a constraint file for everything after it, so pip never
swaps it for another build (on a machine whose pip finds the CPU wheel locally, that is the CPU
build). Install quirks on torch 2.13 (see /work/shared/PEERS.md in the development setup):

- Joey NMT 2.3.0 imports ``importlib_metadata`` without declaring it.
- OpenNMT-py 3.5.x declares ``torch<2.3``, which no resolver can satisfy next to torch 2.13, so it
  is installed with ``--no-deps`` and its declared dependencies (torch excepted) are added after.

These are benchmark-only dependencies; they never go into the project's pyproject.toml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from peerbench.procs import BenchError, ProcResult, run_logged

TORCH_VERSION = "2.13.0"


@dataclass(frozen=True)
class PeerPackage:
    venv: str  # folder name under <work>/venvs
    dist: str  # distribution name on the registry
    version: str
    undeclared: tuple[str, ...] = ()  # imported but not declared
    no_deps: bool = False  # install alone, then its declared dependencies except torch
    modules: tuple[str, ...] = ()  # must import for the toolkit to count as ready

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


JOEY = PeerPackage(venv="joey", dist="joeynmt", version="2.3.0", undeclared=("importlib_metadata",),
                   modules=("joeynmt.training", "joeynmt.prediction"))
ONMT = PeerPackage(venv="onmt", dist="OpenNMT-py", version="3.5.1", no_deps=True,
                   modules=("onmt.bin.train", "onmt.bin.translate"))


def venv_python(venvs: Path, pkg: PeerPackage) -> Path:
    return venvs / pkg.venv / "bin" / "python"


def _ready_check(pkg: PeerPackage) -> str:
    imports = "; ".join(f"import {m}" for m in pkg.modules)
    return (f"import importlib.metadata as m, torch; {imports}; "
            f"assert m.version({pkg.dist!r}) == {pkg.version!r}, m.version({pkg.dist!r}); "
            f"assert torch.__version__.split('+')[0] == {TORCH_VERSION!r}, torch.__version__")


def is_ready(python: Path, pkg: PeerPackage) -> bool:
    if not python.exists():
        return False
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(python), "-c", _ready_check(pkg)], capture_output=True, env=env, check=False)
    return done.returncode == 0


def _pip(python: Path, args: list[str], log: Path) -> ProcResult:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = run_logged([str(python), "-m", "pip", "install", *args], log, env, append=True)
    if result.returncode != 0:
        raise BenchError(f"pip install {' '.join(args)} failed (status {result.returncode}); log: {log}")
    return result


def declared_dependencies(python: Path, dist: str) -> list[str]:
    """The installed distribution's requirements without extras and without torch."""
    code = ("import importlib.metadata as m; "
            f"print('\\n'.join(r for r in (m.requires({dist!r}) or []) if 'extra ==' not in r))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BenchError(f"cannot read the dependencies of {dist}: {out.stderr.strip().splitlines()[-1:]}")
    deps = []
    for line in out.stdout.splitlines():
        name = re.match(r"[A-Za-z0-9_.\-]+", line.strip())
        if name and name.group(0).lower() != "torch":
            deps.append(line.split(";")[0].strip().replace(" ", ""))
    return deps


def ensure_env(venvs: Path, pkg: PeerPackage, log: Path, base_python: str = sys.executable) -> Path:
    """Return the venv's python, creating and installing the venv unless it is already ready."""
    python = venv_python(venvs, pkg)
    if is_ready(python, pkg):
        return python
    folder = venvs / pkg.venv
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"setting up {pkg.requirement} in {folder}\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    made = run_logged([base_python, "-m", "venv", str(folder)], log, dict(os.environ), append=True)
    if made.returncode != 0:
        raise BenchError(f"python -m venv {folder} failed; log: {log}")
    constraints = folder / "constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n", encoding="utf-8")
    _pip(python, [f"torch=={TORCH_VERSION}"], log)
    pin = ["-c", str(constraints)]
    if pkg.no_deps:
        _pip(python, [*pin, "--no-deps", pkg.requirement], log)
        _pip(python, [*pin, *declared_dependencies(python, pkg.dist), *pkg.undeclared], log)
    else:
        _pip(python, [*pin, pkg.requirement, *pkg.undeclared], log)
    if not is_ready(python, pkg):
        raise BenchError(f"{pkg.requirement} installed but does not import with torch {TORCH_VERSION}; "
                         f"log: {log}")
    return python


def package_versions(python: Path, dists: tuple[str, ...]) -> dict[str, str]:
    """Versions of ``dists`` and torch in the environment of ``python``."""
    code = ("import importlib.metadata as m, json, torch; "
            f"print(json.dumps({{**{{d: m.version(d) for d in {list(dists)!r}}}, 'torch': torch.__version__}}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])
