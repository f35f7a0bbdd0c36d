"""One source of truth per default: a schema dataclass states it, and no YAML in conf/ repeats
it. A YAML value equal to its schema default is a second copy that drifts when the schema
changes, so it fails here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from core.config import CONF_DIR
from evaluation.config import EvalJobConfig
from merge.config import MergeJobConfig, MergeRecipeConfig
from train.augment.config import AugmentConfig, AugmentJobConfig
from orchestration.config import ClusterConfig, PipelineConfig, PipelineJobConfig
from train.config import (
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    LoraSettings,
    ModelConfig,
    TrainJobConfig,
)
from train.stages import STAGES

# group folder -> schema of the node it fills
GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "deepspeed": DeepSpeedConfig,
    "logging": LoggingConfig,
    "lora": LoraSettings,
    "merge": MergeRecipeConfig,
    "pipeline": PipelineConfig,
    "cluster": ClusterConfig,
    "augment": AugmentConfig,
}
ROOT_SCHEMAS = {"config.yaml": TrainJobConfig, "merge_job.yaml": MergeJobConfig, "pipeline_job.yaml": PipelineJobConfig,
                "eval_job.yaml": EvalJobConfig, "augment_job.yaml": AugmentJobConfig}
# `# @package _global_` groups: their files set keys of the root config
GLOBAL_GROUPS = {"eval": EvalJobConfig}


def repeated_defaults(values: dict, schema: type, where: str) -> list:
    """Keys in `values` whose value equals the schema's default (recursing into nested schemas)."""
    found = []
    by_name = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        f = by_name.get(key)
        if f is None or key == "defaults":
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            found += repeated_defaults(value, type(default), f"{where}{key}.")
        elif default != MISSING and value == default:  # a schema may spell MISSING as its value, "???"
            found.append(f"{where}{key}: {value!r}")
    return found


def yaml_values(path: Path) -> dict:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    data.pop("defaults", None)
    return data


def conf_files():
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        yield pytest.param(path, id=str(path.relative_to(CONF_DIR)))


@pytest.mark.parametrize("path", conf_files())
def test_yaml_sets_only_what_differs_from_the_schema(path):
    values = yaml_values(path)
    rel = path.relative_to(CONF_DIR)
    if rel.parts[0] == "stage":  # `# @package _global_`: stage.* and training.* from one file
        stage = values.get("stage", {})
        found = repeated_defaults(stage, STAGES[rel.stem].schema, "stage.")
        found += repeated_defaults({k: v for k, v in values.items() if k != "stage"}, TrainJobConfig, "")
    elif len(rel.parts) == 1:
        found = repeated_defaults(values, ROOT_SCHEMAS[rel.name], "")
    elif rel.parts[0] == "size":  # applied over a stage preset: resetting one of its values to the schema's counts
        staged = {key for stage in STAGES for key in yaml_values(CONF_DIR / "stage" / f"{stage}.yaml").get("training", {})}
        found = [f for f in repeated_defaults(values, TrainJobConfig, "")
                 if f.split(":")[0].removeprefix("training.") not in staged]
    elif rel.parts[0] in GLOBAL_GROUPS:
        found = repeated_defaults(values, GLOBAL_GROUPS[rel.parts[0]], "")
    else:
        found = repeated_defaults(values, GROUP_SCHEMAS[rel.parts[0]], f"{rel.parts[0]}.")
    assert not found, f"{rel} repeats schema defaults (delete these lines): {found}"


def test_every_conf_folder_has_a_schema():
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} - {"stage", "size"}
    assert groups == set(GROUP_SCHEMAS) | set(GLOBAL_GROUPS)
    assert {p.name for p in CONF_DIR.glob("*.yaml")} == set(ROOT_SCHEMAS)
