"""The comparison for bench/train_throughput.py: CPT written as a plain TRL script, with no
domainforge code, on the same data, model, tokenizer, DeepSpeed ZeRO-3 config and settings.

    deepspeed --num_gpus 2 bench/plain_trl_cpt.py --steps 40 --seq 512 --out /tmp/plain
"""

import argparse
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--seq", type=int, default=512)
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int, default=-1)
a = p.parse_args()

tokenizer = AutoTokenizer.from_pretrained(ROOT / "train/assets/tiny_tokenizer")
dataset = load_dataset("json", data_files=str(ROOT / "data/materials/cpt.jsonl"), split="train")
args = SFTConfig(
    output_dir=a.out,
    max_steps=a.steps,
    per_device_train_batch_size=1,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    bf16=False,
    fp16=False,
    max_length=a.seq,
    packing=True,
    packing_strategy="wrapped",
    dataset_text_field="text",
    save_strategy="steps",
    save_steps=10**6,
    logging_steps=1,
    report_to="none",
    seed=42,
    include_num_input_tokens_seen="all",
    deepspeed={
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    },
)
config = AutoConfig.for_model(
    "llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()
