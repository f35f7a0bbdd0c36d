"""The comparison for bench/train_throughput.py and bench/gpu_throughput.py: CPT written as a
plain TRL script, with no domainforge code, on the same data, tokenizer, DeepSpeed config and
settings as the project's CPT stage.

    deepspeed --num_gpus 2 bench/plain_trl_cpt.py --steps 40 --seq 512 --out /tmp/plain
    deepspeed --num_gpus 1 bench/plain_trl_cpt.py --precision bf16 --batch 8 --seq 2048 --hidden 2048 \
        --layers 16 --heads 32 --kv-heads 8 --ffn 8192 --vocab 32768 --untied --out /tmp/plain

The model defaults to the tiny preset's shape (conf/model/tiny.yaml). Every setting that TRL's
SFTConfig defaults differently from the project is stated: gradient checkpointing (TRL: on,
the project: off) follows --gradient-checkpointing.
"""

import argparse
import os
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--seq", type=int, default=512)
p.add_argument("--batch", type=int, default=1, help="per-device batch")
p.add_argument("--out", required=True)
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--kv-heads", type=int, default=2)
p.add_argument("--ffn", type=int, default=688)
p.add_argument("--vocab", type=int, default=2048)
p.add_argument("--untied", action="store_true", help="an lm_head of its own (the tiny preset ties it)")
p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
p.add_argument("--zero", type=int, choices=[2, 3], default=3)
p.add_argument("--gradient-checkpointing", action="store_true")
p.add_argument("--liger", action="store_true", help="use_liger_kernel")
p.add_argument("--compile", action="store_true", help="torch_compile")
p.add_argument("--local_rank", type=int, default=-1)
a = p.parse_args()

tokenizer = AutoTokenizer.from_pretrained(ROOT / "train/assets/tiny_tokenizer")
dataset = load_dataset("json", data_files=str(ROOT / "data/materials/cpt.jsonl"), split="train")
args = SFTConfig(
    output_dir=a.out,
    max_steps=a.steps,
    per_device_train_batch_size=a.batch,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    bf16=a.precision == "bf16",
    fp16=False,
    gradient_checkpointing=a.gradient_checkpointing,
    use_liger_kernel=a.liger,
    torch_compile=a.compile,
    max_length=a.seq,
    packing=True,
    packing_strategy="wrapped",
    dataset_text_field="text",
    save_strategy="no",
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
        "zero_optimization": {"stage": a.zero},
        "zero_allow_untested_optimizer": True,
    },
)
config = AutoConfig.for_model(
    "llama", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
    num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=max(4096, a.seq),
    tie_word_embeddings=not a.untied,
)
dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()
# DeepSpeed 0.19.8 leaves a 66 MB /dev/shm all-reduce buffer per CPU rank behind (train/runtime.py
# unlinks the project's); remove this rank's once every rank is done, outside the measured steps.
if not torch.cuda.is_available() and torch.distributed.is_initialized():
    torch.distributed.barrier()
    Path("/dev/shm", "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
        os.environ.get("RANK", "0"))).unlink(missing_ok=True)
