"""launch/preview.py: the rows a stage trains on with their loss masks, and the per-GPU memory
estimate (DeepSpeed's model-state figure plus the activation formula in train/memory.py)."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.env import assert_one_line_error, launch, offline_env
from train.config import compose_train_config
from train.data import IGNORE_INDEX
from train.model import load_tokenizer

MASKED = re.compile(r"\[-100: .*?\]", re.DOTALL)


def sample_block(output: str, index: int) -> str:
    return output.split(f"=== sample {index} ===\n", 1)[1].split("\n\n", 1)[0]


def test_sft_preview_masks_user_and_system_turns_and_counts_the_prepared_labels():
    from train.data.sft import prepare_sft
    from train.preview import preview_text

    cfg = compose_train_config(["+stage=sft", "stage.packing=false", "data.sft.max_samples=4"])
    tokenizer = load_tokenizer(cfg.model)
    rows = prepare_sft(cfg, tokenizer).train_dataset
    output = preview_text(cfg, 2)
    for i in range(2):
        ids, labels = rows[i]["input_ids"], rows[i]["labels"]
        block = sample_block(output, i)
        trained = sum(label != IGNORE_INDEX for label in labels)
        assert block.startswith(f"tokens: {len(ids)}, trained: {trained}\n"), block
        text = block.split("\n", 1)[1]
        masked_text = "".join(MASKED.findall(text))
        trained_text = MASKED.sub("", text)
        assert tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX]) == trained_text
        assert "<|im_start|>system" in masked_text and "<|im_start|>user" in masked_text
        assert "<|im_start|>" not in trained_text and trained_text.strip()
    assert "loss_tokens: " in output


def test_cpt_preview_reports_prepare_cpts_block_count_and_tokens_per_source():
    from train.data.cpt import prepare_cpt
    from train.preview import preview_text

    cfg = compose_train_config(["+stage=cpt", "data=materials_replay", "training.max_seq_length=64",
                                "data.cpt.max_samples=60"])
    data = prepare_cpt(cfg, load_tokenizer(cfg.model))
    output = preview_text(cfg, 1)
    assert f"\n  num_blocks: {len(data.train_dataset)}\n" in output
    per_source = {name: int(n) for name, n in re.findall(r"mix/(\w+)/tokens: \S+ \((\d+) tokens\)", output)}
    assert set(per_source) == {"materials", "general"}
    assert abs(sum(per_source.values()) - data.stats["dataset_tokens"]) <= 1
    assert per_source["general"] == round(data.stats["mix/general/tokens"] * data.stats["dataset_tokens"])
    assert "packing_efficiency: " in output
    assert sample_block(output, 0).startswith("tokens: 64, trained: 64\n")


def test_preference_preview_counts_prompt_chosen_and_rejected_tokens():
    from train.data.preference import prepare_preference
    from train.preview import preview_text

    cfg = compose_train_config(["+stage=dpo", "data.preference.max_samples=4"])
    row = prepare_preference(cfg, load_tokenizer(cfg.model)).train_dataset[0]
    block = sample_block(preview_text(cfg, 1), 0)
    assert block.startswith(f"tokens: prompt {len(row['prompt_ids'])} (no loss), chosen {len(row['chosen_ids'])}, "
                            f"rejected {len(row['rejected_ids'])}\n"), block


def test_preview_of_data_with_wrong_columns_fails_in_one_line(tmp_path):
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    proc = launch("preview.py", ["+stage=sft", f"data.sft.path={bad}"], timeout=300)
    assert_one_line_error(proc, "chats.jsonl")


LLAMA_3_1_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                "tie_word_embeddings": False}


@pytest.fixture
def llama_8b_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    return tmp_path


def test_memory_estimate_is_deepspeeds_model_states_plus_the_activation_formula(llama_8b_dir):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from train.memory import GIB, estimate_for_config, format_estimate

    batch, seq = 2, 4096
    cfg = compose_train_config(["+stage=cpt", "model=llama3_1_8b", "data.allow_demo=true", f"model.path={llama_8b_dir}",
                                "deepspeed=zero3",
                                f"training.per_device_train_batch_size={batch}", f"training.max_seq_length={seq}",
                                "training.gradient_checkpointing=true"])
    params = 8_030_261_248  # Llama-3.1-8B's published parameter count
    _, states, _ = estimate_zero3_model_states_mem_needs(params, 128256 * 4096, 8, 1, cpu_offload=False,
                                                         cpu_offload_params=False)
    h, layers, vocab = 4096, 32, 128256
    activations = layers * 2 * batch * seq * h + 34 * batch * seq * h + 6 * batch * seq * vocab
    result = estimate_for_config(cfg, gpus_per_node=8, nodes=1)
    assert result.inputs.shape.params == params
    assert (result.model_states, result.activations, result.reference) == (states, activations, 0)
    assert f"total per GPU:{' ' * 24}{(states + activations) / GIB:.1f} GiB" in format_estimate(result, None)


def test_memory_command_runs_without_cuda_and_names_the_fix_when_it_does_not_fit(llama_8b_dir):
    from train.memory import GIB, estimate_for_config

    args = ["+stage=sft", "model=llama3_1_8b", "data.allow_demo=true", f"model.path={llama_8b_dir}", "training.gradient_checkpointing=false"]
    proc = launch("preview.py", [*args, "--memory", "--gpus", "8", "--gpu-memory", "40"],
                  env=offline_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = estimate_for_config(compose_train_config(args), gpus_per_node=8, nodes=1).per_gpu
    assert f"does NOT fit: {expected / GIB:.1f} GiB > 40 GiB; try, in order" in proc.stdout
    assert "training.gradient_checkpointing=true -> " in proc.stdout


def test_memory_needs_a_local_config_json():
    proc = launch("preview.py", ["+stage=cpt", "model=llama3_1_8b", "data.allow_demo=true", "--memory"], timeout=300)
    assert_one_line_error(proc, "model.path=meta-llama/Llama-3.1-8B-Instruct", "config.json")
