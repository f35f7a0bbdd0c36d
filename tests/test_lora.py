"""LoRA/QLoRA configuration, DPO with LoRA (no reference copy), model cards, the Hub upload
against a local stand-in, the paper's presets, and bad input: fast, in-process where possible."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from tests.support.env import REPO, assert_one_line_error, launch
from tests.support.hub_standin import HubStandIn
from bench.preference_harness import batch_of, compose, trainer_for
from transformers import BitsAndBytesConfig

from core.errors import UserError
from core.hub import HubConfig, check_hub, push_to_hub
from core.model_card import lineage_record, read_lineage, refresh_model_card, write_model_card
from train.config import compose_train_config, derive_gradient_accumulation
from train.lora import check_finetune, peft_config, quantization_config, target_modules
from train.model import load_model, load_tokenizer, model_config
from train.stages import get_stage


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def test_lora_preset_targets_every_projection_of_the_family():
    cfg = compose_train_config(["+stage=sft", "training.finetune=lora"])
    lora = peft_config(cfg)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.05)
    assert peft_config(compose_train_config(["+stage=sft"])) is None  # full fine-tuning
    mistral = model_config(compose_train_config(["+stage=sft", "model.arch.model_type=mistral"]).model)
    assert target_modules(cfg, mistral) == cfg.lora.family_targets["mistral"]
    attention = compose_train_config(["+stage=sft", "training.finetune=lora", "lora=attention", "lora.r=8"])
    assert set(peft_config(attention).target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert peft_config(attention).r == 8


def test_qlora_is_4bit_nf4_in_the_runs_precision_and_refused_without_a_gpu():
    cfg = compose_train_config(["+stage=sft", "training.finetune=qlora"])
    q = quantization_config(cfg, "bf16")
    assert isinstance(q, BitsAndBytesConfig)
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.bnb_4bit_use_double_quant
    # packed 4-bit weights stored in the run's dtype: what ZeRO-3 + QLoRA needs (PEFT's guide)
    assert q.bnb_4bit_quant_storage == torch.bfloat16
    assert peft_config(cfg).r == 16  # QLoRA trains the same adapters
    check_finetune(cfg, gpu=True, precision="bf16")  # a GPU machine accepts it
    with pytest.raises(UserError, match="training.finetune=qlora needs a GPU"):
        check_finetune(cfg, gpu=False, precision="fp32")
    assert quantization_config(compose_train_config(["+stage=sft", "training.finetune=lora"]), "bf16") is None
    paper = compose_train_config(["+stage=sft", "training.finetune=qlora", "lora=qlora_paper"])
    assert (paper.lora.r, paper.lora.alpha, paper.lora.dropout) == (64, 16, 0.1)


@pytest.mark.parametrize("precision, compute, storage", [
    ("bf16", None, torch.bfloat16), ("fp16", None, torch.float16), ("fp32", None, torch.float32),  # V100/T4: fp16
    ("bf16", "float32", torch.bfloat16), ("fp16", "float32", torch.float16),
])
def test_qlora_stores_its_4bit_weights_in_the_runs_dtype(precision, compute, storage):
    """DeepSpeed casts every parameter whose dtype is not the engine's: packed 4-bit bytes must
    already be in it, whatever the compute dtype."""
    cfg = compose_train_config(["+stage=sft", "training.finetune=qlora", f"lora.qlora_compute_dtype={compute or 'null'}"])
    q = quantization_config(cfg, precision)
    assert q.bnb_4bit_quant_storage == storage
    assert q.bnb_4bit_compute_dtype == (getattr(torch, compute) if compute else storage)


@pytest.mark.parametrize("precision, compute", [("fp16", "bfloat16"), ("bf16", "float16"), ("fp32", "float16")])
def test_a_qlora_compute_dtype_that_is_not_the_runs_is_refused_before_loading(precision, compute):
    cfg = compose_train_config(["+stage=sft", "training.finetune=qlora", f"lora.qlora_compute_dtype={compute}",
                                f"training.precision={precision}"])
    with pytest.raises(UserError) as err:
        check_finetune(cfg, gpu=True, precision=precision)
    run = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    assert str(err.value) == (f"lora.qlora_compute_dtype={compute} does not match this run's precision, {precision} "
                              f"(training.precision={precision}): set lora.qlora_compute_dtype={run} or float32, or "
                              "leave it unset (lora.qlora_compute_dtype=null follows the run)")


def test_qlora_without_bitsandbytes_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    cfg = compose_train_config(["+stage=sft", "training.finetune=qlora"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError) as err:
        check_finetune(cfg, gpu=True, precision="bf16")
    assert "training.finetune=qlora needs bitsandbytes" in str(err.value) and ".[qlora]" in str(err.value)
    assert "\n" not in str(err.value)
    lora = compose_train_config(["+stage=sft", "training.finetune=lora"])
    check_finetune(lora, gpu=True, precision="bf16")  # LoRA does not need it


# ---------------------------------------------------------------------------------------------
# the adapters' learning rate: LoRA is not trained at full fine-tuning rates
# ---------------------------------------------------------------------------------------------
PAPER_8B = ["model=llama3_1_8b", "data.allow_demo=true"]
"""A model whose stage presets are the paper's (the tiny default's size preset sets its own rate)."""


@pytest.mark.parametrize(
    "overrides, rate",
    [
        (["+stage=sft"], 2e-5),                                                  # full: the paper's rate
        (["+stage=sft", "training.finetune=lora"], 2e-4),                        # 10 x the stage's
        (["+stage=dpo", "training.finetune=lora"], 5e-6),                        # alignment-handbook's QLoRA DPO
        (["+stage=dpo", "training.finetune=qlora", "lora=qlora_paper"], 2e-4),   # the lora preset's own rate
        (["+stage=sft", "training.finetune=lora", "training.learning_rate=1e-4"], 1e-4),  # the user's word wins
        (["+stage=sft", "training.finetune=lora", "lora=qlora_paper", "lora.learning_rate=3e-4"], 3e-4),
        (["+stage=sft", "training.finetune=qlora", "lora=qlora_paper", "training.learning_rate=1e-4"], 1e-4),
        (["+stage=sft", "training.finetune=lora", "training.learning_rate=1e-4", "lora.learning_rate=3e-4"], 3e-4),
        (["+stage=sft", "training.learning_rate=1e-4", "lora.learning_rate=3e-4"], 1e-4),  # full ignores lora.*
    ],
)
def test_adapter_runs_train_at_an_adapter_learning_rate(overrides, rate):
    assert compose_train_config([*overrides, *PAPER_8B]).training.learning_rate == pytest.approx(rate)


def test_grid_trains_its_lora_step_at_the_adapter_rate(tmp_path):
    from orchestration.config import compose_pipeline_job
    from orchestration.planner import plan_pipeline

    plan = plan_pipeline(compose_pipeline_job(["pipeline=llama_instruct_grid", f"root={tmp_path}",
                                               "pipeline.start=/models/llama-instruct", "data.allow_demo=true"]))
    rates = {s.name: compose_train_config(s.args).training.learning_rate for s in plan.steps if s.stage}
    assert rates["sft"] == pytest.approx(2e-5) and rates["sft-lora"] == pytest.approx(2e-4), rates


def test_qlora_on_cpu_fails_in_one_line_before_training(tmp_path):
    """The real command's exit path; the other fine-tuning and Hub mistakes are cases of
    tests/test_matrix_train.py, in-process."""
    out = tmp_path / "run"
    proc = launch("train.py", ["+stage=sft", f"output_dir={out}", "training.finetune=qlora"], timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "training.finetune=qlora needs a GPU")
    assert not out.exists()  # nothing was written: it failed before the run directory


# ---------------------------------------------------------------------------------------------
# DPO with LoRA: the reference is the adapter-disabled policy, no second copy
# ---------------------------------------------------------------------------------------------
def test_lora_dpo_has_no_second_model_copy(tmp_path):
    _, full = trainer_for(compose("dpo"), tmp_path / "full")
    _, lora = trainer_for(compose("dpo", "training.finetune=lora"), tmp_path / "lora")
    assert full.ref_model is not None  # full fine-tuning keeps a frozen copy
    assert lora.ref_model is None
    one_model = sum(p.numel() for p in full.model.parameters())
    base = sum(p.numel() for n, p in lora.model.named_parameters() if "lora_" not in n)
    adapters = sum(p.numel() for n, p in lora.model.named_parameters() if "lora_" in n)
    assert base == one_model  # the only full-size weights in the trainer are the policy's
    assert 0 < adapters < 0.2 * one_model
    assert all(not p.requires_grad for n, p in lora.model.named_parameters() if "lora_" not in n)

    rows = [0, 1]
    batch = batch_of(lora, rows)
    assert lora.compute_loss(lora.model, batch).item() == pytest.approx(math.log(2), abs=1e-6)  # B = 0 at start
    with torch.no_grad():  # move the adapters: the reference (adapters off) must not move with them
        for n, p in lora.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        ref_chosen, _ = lora.compute_ref_log_probs(lora.model, batch)
        lora.model.base_model.disable_adapter_layers()
        plain = lora.compute_loss(lora.model, batch).item()
        lora.model.base_model.enable_adapter_layers()
        moved = lora.compute_loss(lora.model, batch).item()
    assert plain == pytest.approx(math.log(2), abs=1e-6)  # adapters off = the reference itself
    assert abs(moved - math.log(2)) > 1e-4
    with torch.no_grad():
        ref_again, _ = lora.compute_ref_log_probs(lora.model, batch)
    assert torch.allclose(ref_chosen, ref_again)


# ---------------------------------------------------------------------------------------------
# model cards
# ---------------------------------------------------------------------------------------------
def test_card_chains_parent_lineage_and_reads_eval_results_defensively(tmp_path):
    parent, child = tmp_path / "cpt", tmp_path / "sft"
    parent.mkdir(), child.mkdir()
    write_model_card(parent, lineage_record({"kind": "stage", "name": "cpt", "output": str(parent)}, ["random-init tiny"]))
    write_model_card(child, lineage_record({"kind": "stage", "name": "sft", "output": str(child),
                                            "data": {"sft": {"path": "qa.jsonl"}}, "versions": {"peft": "0.21.2"}},
                                           [parent]))
    record = read_lineage(child)
    assert record["parents"][0]["step"]["name"] == "cpt"
    assert record["parents"][0]["parents"][0]["step"] == {"kind": "model", "name": "random-init tiny",
                                                          "output": "random-init tiny"}
    (child / "eval").mkdir()
    (child / "eval" / "mcq.json").write_text(json.dumps({"results": {"acc": 0.65, "protocol": "loglik"}, "n": 40}))
    (child / "eval" / "broken.json").write_text("{not json")
    (child / "eval" / "list.json").write_text("[1, 2]")
    assert refresh_model_card(child)
    card = (child / "README.md").read_text()
    assert card.index("random-init tiny") < card.index("stage `cpt`") < card.index("stage `sft`")
    assert "| mcq.json | results.acc | 0.65 |" in card and "| mcq.json | n | 40 |" in card
    assert "| broken.json | (unreadable JSON) |" in card and "| list.json | (no scalar values) |" in card
    assert "qa.jsonl" in card and "- peft 0.21.2" in card
    assert not refresh_model_card(tmp_path)  # no lineage.json: nothing to render


# ---------------------------------------------------------------------------------------------
# Hub upload: against a local HTTP stand-in for the Hub API (HF_ENDPOINT), no mock
# ---------------------------------------------------------------------------------------------
def _hub_env(monkeypatch, endpoint):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_TOKEN", "hf_standin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # read once at import; the launcher gets HF_ENDPOINT
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks LFS


def test_hub_push_uploads_the_model_but_not_checkpoints(tmp_path, monkeypatch):
    model = tmp_path / "model"
    (model / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    (model / "checkpoints" / "checkpoint-2" / "state.bin").write_bytes(b"x")
    with HubStandIn() as hub:
        _hub_env(monkeypatch, hub.endpoint)
        push_to_hub(model, HubConfig(push=True, repo_id="lab/tiny", private=True))
        files = hub.repos["lab/tiny"]["files"]
        assert hub.repos["lab/tiny"]["private"]
        assert files["model.safetensors"] == (model / "model.safetensors").read_bytes()
        assert set(files) == {"config.json", "model.safetensors"}
        assert hub.lfs_files == ["model.safetensors"]  # the weights took the LFS transfer, as on the Hub
        push_to_hub(model, HubConfig(push=True, repo_id="lab/with-ckpt", checkpoints=True))
        assert "checkpoints/checkpoint-2/state.bin" in hub.repos["lab/with-ckpt"]["files"]


def test_failed_hub_push_is_one_user_error_and_leaves_the_model(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with HubStandIn(fail=True) as hub:
        _hub_env(monkeypatch, hub.endpoint)
        with pytest.raises(UserError, match="hub push of .* to lab/tiny failed.*local model is complete"):
            push_to_hub(model, HubConfig(push=True, repo_id="lab/tiny"))
    assert (model / "config.json").read_text() == "{}"
    with pytest.raises(UserError, match="hub.repo_id"):
        check_hub(HubConfig(push=True, repo_id="no-namespace"))


# ---------------------------------------------------------------------------------------------
# presets against the paper's configs (lamm-mit/LLM-finetuning, Bioinspired-Llama-8B/*-Instruct)
# ---------------------------------------------------------------------------------------------
def test_presets_cite_the_papers_values():
    orpo = compose_train_config(["+stage=orpo", *PAPER_8B])
    assert orpo.training.learning_rate == 3e-6
    assert (orpo.stage.max_length, orpo.stage.max_prompt_length) == (2500, 2000)
    assert orpo.training.warmup_steps == 100
    sft = compose_train_config(["+stage=sft", *PAPER_8B])
    assert sft.stage.packing is True
    assert sft.training.warmup_steps == 0.1
    dpo = compose_train_config(["+stage=dpo", *PAPER_8B])
    assert (dpo.stage.beta, dpo.stage.max_prompt_length, dpo.training.learning_rate) == (0.05, 1700, 5e-7)
    # per-device batch x gradient accumulation on the paper's 8 GPUs, and activation checkpointing
    for stage, batch in [("cpt", (6, 2)), ("sft", (6, 2)), ("dpo", (2, 2)), ("orpo", (3, 1))]:
        t = compose_train_config([f"+stage={stage}", *PAPER_8B]).training
        assert (t.per_device_train_batch_size, derive_gradient_accumulation(t, 8)) == batch, stage
        assert t.gradient_checkpointing is True, stage
    for stage, source in [("orpo", "config_full_ORPO-Instruct.yaml"), ("sft", "run_sft.py"),
                          ("dpo", "config_full_DPO-Instruct.yaml"), ("cpt", "config_full_CPT-Instruct.yaml")]:
        text = (REPO / "conf" / "stage" / f"{stage}.yaml").read_text()
        assert "lamm-mit/LLM-finetuning" in text and source in text, stage


@pytest.mark.parametrize("stage", ["orpo", "sft"])
def test_every_stage_trains_only_the_adapters(tmp_path, stage):
    if stage == "sft":
        cfg = compose_train_config(["+stage=sft", "training.finetune=lora", "data.sft.max_samples=8",
                                    "training.max_seq_length=128"])
        st = get_stage("sft")
        tokenizer = load_tokenizer(cfg.model)
        data = st.prepare_data(cfg, tokenizer)
        args = st.trainer_args(cfg, dict(output_dir=str(tmp_path), report_to=["none"], bf16=False, max_steps=1))
        trainer = st.build_trainer(cfg, args, load_model(cfg.model, torch.float32, tokenizer), tokenizer, data, [])
    else:
        _, trainer = trainer_for(compose(stage, "training.finetune=lora"), tmp_path)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert any(n.endswith("mlp.down_proj.lora_B.default.weight") for n in trainable)


# ---------------------------------------------------------------------------------------------
# QLoRA's final save: a real bitsandbytes 4-bit base (its CPU backend), both state-dict layouts
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qlora_model(tmp_path_factory):
    """A tiny Llama loaded 4-bit (nf4, double quantization, storage in the compute dtype) the
    way train/lora.py configures it, with non-zero LoRA adapters on three projections."""
    from peft import LoraConfig, get_peft_model

    cfg = compose_train_config(["+stage=sft", "training.finetune=qlora", "lora.qlora_compute_dtype=float32",
                                "lora.target_modules=[q_proj,v_proj,down_proj]"])
    base_dir = tmp_path_factory.mktemp("qlora") / "base"
    torch.manual_seed(0)
    load_model(cfg.model, torch.float32, load_tokenizer(cfg.model)).save_pretrained(base_dir)
    quantized = load_model(cfg.model, torch.float32, path=str(base_dir),
                           quantization_config=quantization_config(cfg, "fp32"))
    adapters = peft_config(cfg)
    adapters.init_lora_weights = False  # random A and B: the delta is not zero
    return get_peft_model(quantized, adapters)


class SavingTrainer:
    """What save_adapter_and_merged reads of a Trainer, for a model outside DeepSpeed."""

    def __init__(self, model, state_dict):
        self.model, self.deepspeed, self.is_deepspeed_enabled = model, model, True
        self.accelerator = self
        self._state = state_dict

    def get_state_dict(self, engine):
        return self._state

    def unwrap_model(self, model):
        return model

    def is_world_process_zero(self):
        return True


@pytest.mark.parametrize("layout", ["plain", "zero3"])
def test_qlora_saves_a_plain_merged_model_equal_to_dequantized_base_plus_delta(qlora_model, tmp_path, layout):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    from train.lora import save_adapter_and_merged

    state = qlora_model.state_dict()
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    assert f"{q_proj}.base_layer.weight.absmax" in state  # bitsandbytes' extra keys, without ZeRO-3
    if layout == "zero3":  # DeepSpeed's gather: the packed storage tensors only
        state = {k: v for k, v in state.items() if ".weight." not in k}
    packed = state[f"{q_proj}.base_layer.weight"]
    assert packed.shape[1] == 1 and packed.dtype == torch.float32  # [n, 1] in bnb_4bit_quant_storage

    save_adapter_and_merged(SavingTrainer(qlora_model, state), tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(merged.config, "quantization_config", None) is None
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    ours = dict(merged.named_parameters())
    for name, module in qlora_model.named_modules():
        if not (hasattr(module, "base_layer") and isinstance(module.base_layer, bnb.nn.Linear4bit)):
            continue
        weight = module.base_layer.weight
        expected = dequantize_4bit(weight.data, weight.quant_state)
        if "default" in getattr(module, "lora_A", {}):
            expected = expected + module.get_delta_weight("default")
        plain = name.replace("base_model.model.", "", 1) + ".weight"
        assert torch.allclose(ours[plain], expected, atol=1e-6), plain
    delta = qlora_model.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default")
    assert delta.abs().max() > 1e-3  # the adapters moved q_proj
    embed = "base_model.model.model.embed_tokens.weight"
    assert torch.equal(ours["model.embed_tokens.weight"], qlora_model.state_dict()[embed])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
