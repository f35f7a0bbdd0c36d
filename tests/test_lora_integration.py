"""LoRA through the real launcher, ZeRO-3 across 2 CPU ranks on the tiny model, as a 3-step
pipeline driven stage by stage: full CPT -> LoRA SFT (pushed to a local Hub stand-in) -> SLERP
merge of the two, plus a LoRA DPO run on the SFT output.

The LoRA SFT loss falls; it saves the adapter and the merged model; the merged model equals
PEFT's own merge of the saved adapter onto the CPT weights, loads with AutoModelForCausalLM and
generates; the Hub stand-in (a real HTTP server on 127.0.0.1, HF_ENDPOINT, no mocks) holds the
same bytes; the merge's card lists the whole lineage; LoRA DPO trains with no reference copy."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tests.support.env import SMALL_BATCH, generates, launch, loss_history, offline_env, tail
from tests.support.hub_standin import HubStandIn
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from core.config import REPO_ROOT
from core.model_card import lineage_steps, read_lineage, refresh_model_card

pytestmark = pytest.mark.integration

FAST = [
    *SMALL_BATCH,
    "training.max_seq_length=256",
    "training.warmup_steps=0",
    "training.lr_scheduler_type=constant",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def cpt(runs):
    out = runs / "cpt"
    proc = launch("train.py", ["+stage=cpt", f"output_dir={out}", *FAST, "training.learning_rate=1e-3",
                               "training.max_steps=6", "training.save_steps=6",
                               "training.gradient_checkpointing=true"], ranks=2)  # full, ZeRO-3: non-reentrant
    assert proc.returncode == 0, tail(proc)
    return out


@pytest.fixture(scope="module")
def hub():
    with HubStandIn() as server:
        yield server


@pytest.fixture(scope="module")
def sft(runs, cpt, hub):
    out = runs / "sft"
    env = offline_env(**hub.client_env())
    proc = launch("train.py", ["+stage=sft", f"model.path={cpt}", f"output_dir={out}", *FAST,
                               "training.finetune=lora", "training.learning_rate=3e-3", "stage.packing=false",
                               "training.gradient_checkpointing=true",  # LoRA under ZeRO-3: reentrant
                               "training.max_steps=24", "training.save_steps=12",
                               "hub.push=true", "hub.repo_id=lab/tiny-sft-lora"], ranks=2, env=env)
    assert proc.returncode == 0, tail(proc)
    return out, proc


def test_lora_sft_under_zero3_loss_falls(sft):
    out, proc = sft
    losses = loss_history(out)
    assert len(losses) == 24
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    assert len(re.findall(r"\[rank \d/2\] holds", proc.stdout)) == 2  # both ranks, ZeRO-3


def checkpointing_of(out):
    """(activation_checkpointing, use_reentrant) of the TrainingArguments a run trained with."""
    args = torch.load(sorted((out / "checkpoints").glob("checkpoint-*/training_args.bin"))[-1], weights_only=False)
    return args.activation_checkpointing, (args.activation_checkpointing_kwargs or {}).get("use_reentrant")


def test_activation_checkpointing_trains_full_and_lora_under_zero3(cpt, sft):
    """Both runs above trained with training.gradient_checkpointing=true (the paper presets'
    setting): full fine-tuning non-reentrant, LoRA reentrant, as TRL requires under ZeRO-3."""
    assert checkpointing_of(cpt) == (True, False)
    assert checkpointing_of(sft[0]) == (True, True)
    losses = loss_history(cpt)
    assert losses[-1] < losses[0], losses


def test_lora_sft_saves_adapter_and_the_merged_model(sft, cpt):
    out, _ = sft
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert any(k.endswith("mlp.down_proj.lora_B.weight") for k in adapter)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 16

    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cpt), out / "adapter").merge_and_unload()
    base = dict(AutoModelForCausalLM.from_pretrained(cpt).named_parameters())
    ours = dict(merged.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.allclose(ours[name], p, atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(ours[q], base[q])  # the adapter moved the weights
    assert generates(out)
    assert not any(k.startswith("base_model") for k in load_file(out / "model.safetensors"))  # plain HF names


def test_hub_holds_the_published_model(sft, hub):
    out, proc = sft
    assert "pushed" in proc.stdout
    repo = hub.repos["lab/tiny-sft-lora"]
    assert repo["private"]
    assert repo["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert {"config.json", "README.md", "lineage.json", "adapter/adapter_model.safetensors"} <= set(repo["files"])
    assert sorted(hub.lfs_files) == ["adapter/adapter_model.safetensors", "model.safetensors"]  # the weights' upload path
    assert not any(p.startswith("checkpoints/") for p in repo["files"])


@pytest.fixture(scope="module")
def merged(runs, cpt, sft):
    out = runs / "slerp"
    proc = launch("merge.py", ["merge=paper_slerp", f"merge.base_model={cpt}", f"merge.model={sft[0]}",
                               f"output_dir={out}", "merge.dtype=float32", "workers=1"])
    assert proc.returncode == 0, tail(proc)
    return out


def test_model_card_lists_the_real_lineage_of_the_pipeline(merged, cpt, sft):
    steps = lineage_steps(read_lineage(merged))
    assert [(s["kind"], s["name"]) for s in steps] == [
        ("model", "random-init tiny"), ("stage", "cpt"), ("stage", "sft"), ("merge", "slerp")]
    cpt_step, sft_step = steps[1], steps[2]
    assert cpt_step["output"] == str(cpt.resolve()) and sft_step["start_model"] == str(cpt.resolve())
    assert cpt_step["data"]["cpt"]["path"].endswith("cpt.jsonl") and sft_step["data"]["sft"]["path"].endswith("sft.jsonl")
    assert sft_step["finetune"] == "lora" and sft_step["lora"]["r"] == 16
    assert sft_step["hyperparameters"]["training"]["learning_rate"] == 3e-3
    assert "peft" in sft_step["versions"] and "numpy" in steps[3]["versions"]
    card = (merged / "README.md").read_text()
    for needle in ("random-init tiny", "stage `cpt`", "stage `sft`", "merge `slerp`", "fine-tuning: `lora`",
                   "sft.jsonl", "merge_method: slerp", "No results yet"):
        assert needle in card, needle
    assert card.index("stage `cpt`") < card.index("stage `sft`") < card.index("merge `slerp`")

    (merged / "eval").mkdir()
    (merged / "eval" / "mcq.json").write_text(json.dumps({"acc": 0.42}))
    assert refresh_model_card(merged)
    assert "| mcq.json | acc | 0.42 |" in (merged / "README.md").read_text()
    assert "stage `sft`" in (merged / "README.md").read_text()


def test_lora_dpo_trains_without_a_second_model_copy(runs, sft, tmp_path):
    rows = [json.loads(l) for l in (REPO_ROOT / "data" / "materials" / "preference.jsonl").read_text().splitlines()[:48]]
    data = tmp_path / "learnable.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"],
                                        "rejected": "I cannot say, maybe ask someone."}) + "\n" for r in rows))
    out = runs / "dpo"
    proc = launch("train.py", ["+stage=dpo", f"model.path={sft[0]}", f"output_dir={out}",
                               f"data.preference.path={data}", "training.finetune=lora", *SMALL_BATCH,
                               "training.learning_rate=5e-3", "training.warmup_steps=0",
                               "training.lr_scheduler_type=constant", "training.per_device_train_batch_size=2",
                               "stage.max_length=256", "stage.max_prompt_length=192", "training.max_steps=12",
                               "training.save_steps=12"], ranks=2)
    assert proc.returncode == 0, tail(proc)
    assert "reference model holds" not in proc.stdout  # full DPO reports its reference copy here
    assert len(re.findall(r"\[rank \d/2\] holds", proc.stdout)) == 2  # the policy, once per rank
    states = sorted((out / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    log = [r for r in json.loads(states[-1].read_text())["log_history"] if "loss" in r]
    margins = [r["rewards/margins"] for r in log]
    assert sum(margins[-4:]) / 4 > sum(margins[:4]) / 4, margins
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert generates(out)
