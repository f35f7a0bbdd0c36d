"""The flags every Hydra entry point takes besides its key=value overrides:

    -h, --help   its command lines, config groups with their presets, the keys set most, an example
    --cfg        the resolved config (presets, overrides and value checks applied) as YAML

Both exit 0 and run nothing (no torch import). Groups and presets are read from conf/, the keys'
defaults and descriptions from the schema dataclasses, so the usage cannot drift from them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple

import yaml
from omegaconf import DictConfig

from core.config import CONF_DIR, presets, resolved_yaml, schema_file
from core.errors import UserError

HELP_FLAGS = ("-h", "--help")
CONFIG_FLAGS = ("--cfg", "--print-config")  # --cfg is Hydra's name; the other is what other tools call it
HYDRA_CFG_MODES = ("job", "all")  # Hydra's `--cfg job`, typed from habit, means the same here
LAUNCHER_FLAGS = ("--local_rank", "--local-rank")  # the deepspeed launcher appends one; train.config drops it


@dataclass(frozen=True)
class ConfigCommand:
    """A launcher that composes conf/<config_name>.yaml onto `schema` with `compose`."""

    script: str
    """launch/<script>, as usage and errors name it."""
    config_name: str
    schema: type
    compose: Callable[[List[str]], DictConfig]
    keys: Tuple[str, ...]
    """The keys users set most, shown by --help with their schema defaults."""
    example: str
    """The arguments of one example command."""
    flags: Tuple[Tuple[str, str], ...] = ()
    """The launcher's own flags, (flag, what it does), which it removes before calling `config`."""
    config_dir: Path = CONF_DIR

    def config(self, argv: List[str], doc: str) -> DictConfig:
        """The composed config of `argv`; --help prints the usage and --cfg the config, and both
        exit 0 here."""
        if wants_help(argv):
            exit_printing(self.usage(doc))
        cfg = self.compose(self.overrides(argv))
        if wants_config(argv):
            exit_printing(resolved_yaml(cfg))
        return cfg

    def overrides(self, argv: List[str]) -> List[str]:
        """`argv` less --cfg; any other flag is a mistake Hydra would report as a lexer error."""
        rest = without_cli_flags(argv)
        for arg in rest:
            if arg.startswith("-") and not arg.startswith(LAUNCHER_FLAGS):
                flags = "".join(f"{flag}, " for flag, _ in self.flags)
                raise UserError(
                    f"unknown option '{arg}': launch/{self.script} takes key=value overrides, {flags}--cfg and "
                    f"--help (python launch/{self.script} --help)"
                )
        return rest

    def usage(self, doc: str) -> str:
        return "\n\n".join([doc.strip(), self.groups_help(), self.keys_help(), self.flags_help()]) + "\n"

    def groups_help(self) -> str:
        rows = [(f"+{group}" if default is ADDED else group, describe_presets(self.config_dir, group, default))
                for group, default in config_groups(self.config_name, self.schema, self.config_dir)]
        return ("Config groups (presets in conf/<group>/ and $DOMAINFORGE_CONF/<group>/; pick one with "
                "group=<preset> or group=/path/to/preset.yaml):\n" + table(rows))

    def keys_help(self) -> str:
        root = yaml.safe_load((self.config_dir / f"{self.config_name}.yaml").read_text())
        rows = [(key, *field_summary(self.schema, key, root)) for key in self.keys]
        return (f"Keys set most (key=value; every field of {schema_file(self.schema)} can be set), with the\n"
                "schema's defaults: a preset may change them, --cfg shows the values a run uses.\n" + table(rows))

    def flags_help(self) -> str:
        return ("Flags:\n" + table([*self.flags, ("--cfg", "print the resolved config as YAML and exit; nothing runs"),
                                   ("-h, --help", "print this message and exit")])
                + f"\n\nExample:\n  python launch/{self.script} {self.example} --cfg")


def wants_help(argv: List[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def wants_config(argv: List[str]) -> bool:
    return any(arg in CONFIG_FLAGS for arg in argv)


def without_cli_flags(argv: List[str]) -> List[str]:
    """`argv` less --help and --cfg (with a Hydra mode word after it): Hydra never sees them."""
    rest, previous = [], None
    for arg in argv:
        if not (arg in HELP_FLAGS or arg in CONFIG_FLAGS or (previous in CONFIG_FLAGS and arg in HYDRA_CFG_MODES)):
            rest.append(arg)
        previous = arg
    return rest


def exit_printing(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
    raise SystemExit(0)


# ---------------------------------------------------------------------------------------------
# groups from conf/, keys from the schema
# ---------------------------------------------------------------------------------------------
ADDED = object()
"""The default of a group that is not in the defaults list: the user adds it (+stage=cpt)."""


def config_groups(config_name: str, schema: type, config_dir: Path) -> List[Tuple[str, object]]:
    """(group, default preset) from conf/<config_name>.yaml's defaults list, then the schema's
    fields that have a conf/ folder but no default there (chosen with +group=<preset>)."""
    defaults = yaml.safe_load((config_dir / f"{config_name}.yaml").read_text()).get("defaults", [])
    fields = {f.name: f for f in dataclasses.fields(schema)}
    groups = []
    for entry in defaults:
        if isinstance(entry, dict):
            group, default = next(iter(entry.items()))
            group = group.removeprefix("optional ")
            # listed with no preset where the schema has none either: the user adds it (+stage=cpt)
            added = default is None and group in fields and fields[group].default is None
            groups.append((group, ADDED if added else default))
    listed = {group for group, _ in groups}
    added = [(f.name, ADDED) for f in dataclasses.fields(schema)
             if f.name not in listed and (config_dir / f.name).is_dir()]
    return groups + added


def describe_presets(config_dir: Path, group: str, default: object) -> str:
    choices = " | ".join(presets(config_dir, group))
    if default is ADDED:
        return f"{choices}  (none by default: add +{group}=<preset>)"
    if isinstance(default, str) and "${" in default:  # named after other groups' choices
        named = re.sub(r"\$\{(\w+)\}", r"<\1>", default)
        return f"{choices}  (default: conf/{group}/{named}.yaml, where there is one)"
    return f"{choices}  (default: {default if default is not None else 'none'})"


def field_summary(schema: type, dotted: str, root: dict) -> Tuple[str, str]:
    """(default, first sentence of the field's docstring) of a dotted key of `schema`; the
    default is the root YAML's value where it sets one (train's output_dir)."""
    *parents, name = dotted.split(".")
    for parent in parents:
        schema = dataclass_in(typing.get_type_hints(schema)[parent])
    field = {f.name: f for f in dataclasses.fields(schema)}[name]
    default = format_value(root[dotted]) if dotted in root else format_default(field)
    return default, first_sentence(field_doc(schema, field))


def dataclass_in(hint) -> type:
    """The dataclass in a field's type hint (Optional[X] -> X)."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next(arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg))


def format_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return format_value(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return format_value(field.default_factory())
    return "(required)"


def format_value(value) -> str:
    if value == "???":  # omegaconf.MISSING
        return "(required)"
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def field_doc(schema: type, field: dataclasses.Field) -> str:
    """The docstring under a field (litgpt style), or its command-line help (merge options)."""
    for cls in schema.__mro__:
        if field.name in getattr(cls, "__annotations__", {}):
            body = ast.parse(inspect.getsource(cls).strip()).body[0].body
            for stmt, after in zip(body, body[1:]):
                if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", None) == field.name:
                    if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                        return str(after.value.value)
    return str(field.metadata.get("help", ""))


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def table(rows: List[Tuple[str, ...]], width: int = 100) -> str:
    """Aligned columns, two spaces in, the last one wrapped under itself."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lead = 2 + sum(w + 2 for w in widths)
    lines = []
    for row in rows:
        start = "  " + "".join(cell.ljust(w + 2) for cell, w in zip(row, widths))
        wrapped = textwrap.wrap(row[-1], max(width - lead, 40)) or [""]
        lines += [(start + wrapped[0]).rstrip()] + [" " * lead + more for more in wrapped[1:]]
    return "\n".join(lines)

