"""The dataclasses in ``seq2seq/core/config.py`` are the single source of defaults: no YAML file
under ``configs/`` restates one, and every group option still composes.

The rule (see the docstring of ``seq2seq/core/config.py``): a file sets only what differs from
what its package already has without it.

* a group option ``configs/<group>/<option>.yaml`` is compared with the schema default at its
  package (``<group>`` with ``/`` as ``.``, or the root for ``# @package _global_``);
* a primary config (``configs/<name>.yaml``) with the schema its defaults list names;
* an experiment (``configs/experiment/``, loaded after ``_self_``) with the composition without
  it, under its own group overrides and under every other single group option (a key that a
  group option sets differently is not a restatement, as the experiment fixes it there);
* ``DEFINING_KEYS`` may restate a default: they name what a group option is.

The files are found by walking ``configs/``, so a new file is covered without editing this module.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from seq2seq.cli import CONFIG_DIR, compose_checked
from seq2seq.core.config import EvaluateConfig, TrainConfig, TranslateConfig, register_configs

# Per group, the keys that name what an option is: kept even when they equal the default.
DEFINING_KEYS: dict[str, set[str]] = {
    "data": {"corpus"},
    "tokenizer": {"model_type"},
    "model/attention": {"type"},
    "optim": {"name"},
    "search": {"beam_size"},
}
# Groups of overrides on a composed config (loaded after ``_self_``), compared with the composition.
OVERRIDE_GROUPS = {"experiment"}
NOT_VALUES = ("defaults", "hydra")  # top-level keys of a file that are not config values
SCHEMAS = (TrainConfig, EvaluateConfig, TranslateConfig)  # where a group's package is looked up

# configs/hydra/ configures Hydra's plugins (the submitit launcher), whose schema is theirs: those
# files are examples that name every key a cluster user sets, defaults included.
FILES = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if "hydra" not in p.relative_to(CONFIG_DIR).parts)
GROUP_FILES = [p for p in FILES if p.parent != CONFIG_DIR]
PRIMARY_FILES = [p for p in FILES if p.parent == CONFIG_DIR]


def group_of(path: Path) -> str:
    return path.parent.relative_to(CONFIG_DIR).as_posix()


def rel(path: Path) -> str:
    return path.relative_to(CONFIG_DIR.parent).as_posix()


def package_of(path: Path) -> str:
    """The config node a group option merges into: its ``# @package`` header or its group."""
    group = group_of(path).replace("/", ".")
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break  # the header is in the leading comment block
        match = re.match(r"\s*#\s*@package\s+(\S+)", line)
        if match:
            package = match.group(1).replace("_group_", group)
            return package.removeprefix("_global_").lstrip(".")
    return group


def values_of(path: Path) -> dict:
    """A file's config values: its content without the defaults list and the hydra node."""
    content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {k: v for k, v in (content or {}).items() if k not in NOT_VALUES}


def leaves(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the values a YAML mapping sets (lists and empty mappings are values)."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += leaves(value, f"{path}.")
        else:
            out.append(path)
    return out


def lookup(tree: Any, path: str) -> tuple[bool, Any]:
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return False, None
        tree = tree[key]
    return True, tree


def restated(base: DictConfig, values: dict) -> dict[str, Any]:
    """``{path: value}`` for each value in ``values`` that ``base`` already has.

    The values are merged into ``base`` first, so they are typed by the schema as Hydra types them
    (``"bahdanau"`` is the enum member, ``1`` is ``1.0`` for a float) before being compared.
    """
    merged = OmegaConf.to_container(OmegaConf.merge(base, values), resolve=False, enum_to_str=True)
    before = OmegaConf.to_container(base, resolve=False, enum_to_str=True)
    out = {}
    for path in leaves(values):
        known, old = lookup(before, path)
        if known and lookup(merged, path)[1] == old:
            out[path] = old
    return out


@cache
def schema_at(package: str) -> DictConfig:
    """The schema defaults at a dotted package ("" is the root of ``TrainConfig``)."""
    for schema in SCHEMAS:
        node = OmegaConf.structured(schema)
        node = OmegaConf.select(node, package) if package else node
        if isinstance(node, DictConfig):
            return node
    raise AssertionError(f"no schema has a config node '{package}'")


def primary_schema(path: Path) -> DictConfig:
    """The schema a primary config's defaults list names (``train_schema`` for train.yaml)."""
    defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults", [])
    names = [d for d in defaults if isinstance(d, str) and d.endswith("_schema")]
    assert len(names) == 1, f"{rel(path)}: expected one *_schema entry in its defaults list"
    return OmegaConf.structured(ConfigStore.instance().load(f"{names[0]}.yaml").node)


def group_choices(path: Path) -> dict[str, str]:
    """``{group: option}`` for the group entries of a defaults list (``override /`` dropped)."""
    out = {}
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        if isinstance(entry, dict):
            for key, option in entry.items():
                if option is not None:
                    out[key.removeprefix("override").strip().lstrip("/")] = option
    return out


@cache
def compose_train(choices: tuple[tuple[str, str], ...]) -> DictConfig:
    """``train`` composed with these group choices (cached: experiments share baselines)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose("train", overrides=[f"{g}={o}" for g, o in choices])


def experiment_baselines(path: Path) -> list[DictConfig]:
    """``train`` composed without the experiment: with its own group overrides, then with each
    other group option on top (a command-line choice beats the experiment's override)."""
    own = {**group_choices(CONFIG_DIR / "train.yaml"), **group_choices(path)}
    choices = [{}] + [{group_of(p): p.stem} for p in GROUP_FILES
                      if group_of(p) not in OVERRIDE_GROUPS]
    return [compose_train(tuple(sorted({**own, **choice}.items()))) for choice in choices]


@pytest.fixture(scope="module", autouse=True)
def _schemas() -> None:
    register_configs()


# ----------------------------------------------------------------------------- restated defaults


def test_configs_are_found():
    groups = {group_of(p) for p in GROUP_FILES}
    assert {"model", "model/attention", "optim", "search", "tokenizer", "trainer", "experiment"} <= groups
    assert {"train.yaml", "evaluate.yaml", "translate.yaml"} <= {p.name for p in PRIMARY_FILES}
    assert set(DEFINING_KEYS) <= groups, "DEFINING_KEYS names a group with no folder"


@pytest.mark.parametrize("group", sorted(DEFINING_KEYS))
def test_defining_keys_are_schema_keys(group: str):
    node = schema_at(group.replace("/", "."))
    assert DEFINING_KEYS[group] <= set(node.keys()), f"DEFINING_KEYS[{group!r}] names an unknown key"


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_no_restated_default(path: Path):
    values = values_of(path)
    if not values:
        return
    if path.parent == CONFIG_DIR:
        found = restated(primary_schema(path), values)
        what = "the schema default"
    elif group_of(path) in OVERRIDE_GROUPS:
        per_baseline = [restated(base, values) for base in experiment_baselines(path)]
        found = {k: v for k, v in per_baseline[0].items() if all(k in r for r in per_baseline)}
        what = "what the composition without it gives"
    else:
        group, package = group_of(path), package_of(path)
        found = restated(schema_at(package), values)
        allowed = {f"{group.replace('/', '.')}.{k}" for k in DEFINING_KEYS.get(group, ())}
        prefix = f"{package}." if package else ""
        found = {k: v for k, v in found.items() if f"{prefix}{k}" not in allowed}
        what = f"the schema default at '{package or '<root>'}'"
    problems = [f"{rel(path)}: '{key}' restates {what} ({value!r}); remove it"
                for key, value in found.items()]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- composing


@pytest.mark.parametrize("path", GROUP_FILES, ids=rel)
def test_every_group_option_composes(path: Path):
    compose_checked("train", [f"{group_of(path)}={path.stem}"])


@pytest.mark.parametrize("path", PRIMARY_FILES, ids=rel)
def test_every_primary_config_composes(path: Path):
    required = [k for k in OmegaConf.missing_keys(primary_schema(path)) if "." not in k]
    compose_checked(path.stem, [f"{k}=x" for k in sorted(required)])
