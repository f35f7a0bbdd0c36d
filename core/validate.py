"""Declarative value checks for schema fields, and the one walker that runs them.

A field says its domain once, in its schema:

    learning_rate: float = checked(2e-5, positive)
    workers: Optional[int] = field(default=None, metadata={"check": (at_least(1),)})

Hydra/OmegaConf does not run a dataclass's `__post_init__` when it composes a structured
config (it builds nodes from the fields and checks only types), so `compose_config` calls
`validate_config` on the composed tree instead: every node keeps its schema class
(`OmegaConf.get_type`), and each field's checks run on its value. Plain dataclass instances
(MergeOptions built from argparse flags) go through `validate_dataclass`. The first failure is
one UserError naming the key, the value and the allowed range: `training.learning_rate=-1:
must be > 0`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from core.errors import UserError


@dataclass(frozen=True)
class Check:
    """A predicate on one value and the rule it enforces, as the message states it."""

    test: Callable[[Any], bool]
    rule: str

    def problem(self, value: Any) -> Optional[str]:
        """None when `value` passes; otherwise what is wrong (the rule, or a finer reason)."""
        try:
            ok = self.test(value)
        except TypeError:  # e.g. a string where a number is needed
            return self.rule
        if ok is True:
            return None
        return ok if isinstance(ok, str) else self.rule


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def greater_than(bound: float) -> Check:
    return Check(lambda v: _number(v) and v > bound, f"must be > {bound}")


def at_least(bound: float) -> Check:
    return Check(lambda v: _number(v) and v >= bound, f"must be >= {bound}")


def between(lo: float, hi: float) -> Check:
    return Check(lambda v: _number(v) and lo <= v <= hi, f"must be in [{lo}, {hi}]")


def one_of(*choices: Any) -> Check:
    return Check(lambda v: v in choices, "must be one of " + ", ".join(str(c) for c in choices))


def either(value: Any, other: Check) -> Check:
    """`value` itself (a sentinel such as -1) or anything `other` accepts."""
    return Check(lambda v: v == value or other.problem(v) is None, f"must be {value} or {other.rule[len('must be '):]}")


positive = greater_than(0)
non_negative = at_least(0)
unit_interval = Check(lambda v: _number(v) and 0 < v <= 1, "must be in (0, 1]")
open_unit_interval = Check(lambda v: _number(v) and 0 < v < 1, "must be in (0, 1)")


def _accepts_new_entries(directory: Path) -> Optional[str]:
    """None when a directory can really be made inside `directory`; otherwise why not.

    os.access alone is not proof: it says yes to root for any directory not on a read-only
    mount, /proc included, where mkdir then fails (ENOENT). Making (and removing) a hidden
    directory is the one test every filesystem answers truthfully."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return "is not writable (read-only or no permission)"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".domainforge-write-test-", dir=directory))
    except OSError as err:
        return f"does not accept new directories ({err.strerror or err.__class__.__name__})"
    return None


def _writable_output(value: Any) -> Any:
    """A directory the run can create or write into: not an existing file, and its nearest
    existing ancestor a directory that accepts new entries."""
    path = Path(os.path.expanduser(str(value))).absolute()
    if path.exists():
        if not path.is_dir():
            return "is an existing file, not a directory: choose a directory path"
        problem = _accepts_new_entries(path)
        return True if problem is None else f"{problem}: choose a writable directory"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file, not a directory"
    problem = _accepts_new_entries(parent)
    if problem is not None:
        return f"cannot be created: {parent} {problem}: choose a directory on a writable filesystem"
    return True


writable_dir = Check(_writable_output, "must be a directory this run can create or write")


def checked(default: Any, *checks: Check, **field_kwargs) -> Any:
    """A dataclass field with `default` whose value must pass `checks` (None always passes:
    it means "unset")."""
    metadata = dict(field_kwargs.pop("metadata", {}), check=checks)
    return dataclasses.field(default=default, metadata=metadata, **field_kwargs)


def field_checks(f: dataclasses.Field) -> Iterable[Check]:
    return f.metadata.get("check", ())


def check_value(key: str, value: Any, checks: Iterable[Check]) -> None:
    if value is None:
        return
    for check in checks:
        problem = check.problem(value)
        if problem is not None:
            raise UserError(f"{key}={value}: {problem}")


def validate_dataclass(obj: Any, prefix: str = "") -> None:
    """Run every field's checks on a dataclass instance (nested dataclasses included)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        check_value(prefix + f.name, value, field_checks(f))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_dataclass(value, f"{prefix}{f.name}.")


def validate_config(node: Any, prefix: str = "") -> None:
    """Walk a composed OmegaConf tree; every node typed by a schema dataclass has its fields
    checked. Lists (e.g. pipeline steps) are walked element by element."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            validate_config(item, f"{prefix[:-1]}[{i}].")
        return
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    checks = {f.name: tuple(field_checks(f)) for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    for key in node.keys():
        value = node._get_node(key)
        if isinstance(value, (DictConfig, ListConfig)):
            if not value._is_none() and not value._is_missing():
                validate_config(value, f"{prefix}{key}.")
            continue
        if key in checks and not OmegaConf.is_missing(node, key):
            check_value(f"{prefix}{key}", node[key], checks[key])
