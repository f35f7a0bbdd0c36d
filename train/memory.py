"""Per-GPU memory estimate for a training run, from the model's config.json alone (no weights).

    model states  DeepSpeed's own estimators (estimate_zero3_model_states_mem_needs /
                  estimate_zero2_model_states_mem_needs): 16-bit params, grads and fp32 Adam
                  states, partitioned by ZeRO stage and offload, with DeepSpeed's buffers
    activations   per micro-batch of b sequences of s tokens, hidden h, a heads, L layers, V vocab
                  (Korthikanti et al. 2022, 16-bit, no tensor/sequence parallelism):
                    one layer        34*b*s*h  (+ 5*a*s^2*b with eager attention; sdpa and flash
                                     attention never store the s x s matrix)
                    checkpointing    L * 2*b*s*h (each layer's 16-bit input) + one layer, recomputed
                    no checkpointing L * one layer
                    logits           6*b*s*V (16-bit logits and their fp32 copy for the loss)
    reference     DPO without precomputed log-probs: a frozen 16-bit copy (2 bytes/param,
                  partitioned under ZeRO-3)

It is an estimate: allocator fragmentation, NCCL buffers and the CUDA context (~1-3 GiB) come on top.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from core.errors import UserError
from core.outputs import MODEL_CACHE_DIR
from core.safetensors_header import read_header

GIB = 1024 ** 3
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from config.json (a Llama-style decoder: Llama, Mistral, Qwen2)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    experts: int = 1
    """MLPs per layer (an MoE's experts; 1 for a dense model)."""

    @property
    def params(self) -> int:
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        layer = attention + 3 * self.hidden * self.intermediate * self.experts + 2 * self.hidden  # q,o,k,v; gate,up,down; 2 norms
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * layer + self.hidden  # + the final norm

    @property
    def largest_layer_params(self) -> int:
        """The largest single module (DeepSpeed gathers one at a time under ZeRO-3)."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


def shape_of(config: dict, where: str) -> ModelShape:
    config = config.get("text_config", config)  # a multimodal config holds the decoder's here
    missing = [key for key in SHAPE_KEYS if key not in config]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}: the memory estimate needs a Llama-style decoder config")
    heads = int(config["num_attention_heads"])
    return ModelShape(
        hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        experts=int(config.get("num_local_experts") or config.get("num_experts") or 1),
    )


def params_in_model_dir(path: Path) -> Optional[int]:
    """Parameters of a model directory: exact from its safetensors headers (each tensor's shape),
    else from its config.json; None when it has neither."""
    files = sorted(Path(path).glob("*.safetensors"))
    if files:
        return sum(t.numel for f in files for t in read_header(f).tensors.values())
    config = Path(path) / "config.json"
    return shape_of(json.loads(config.read_text()), str(config)).params if config.is_file() else None


def model_shape(model_cfg) -> ModelShape:
    """From model.arch (random-init presets) or model.path/config.json; never the Hub."""
    if model_cfg.path is None:
        if not model_cfg.arch:
            raise UserError(f"model '{model_cfg.name}' has neither model.path nor model.arch: set model.path=<dir>")
        return shape_of(dict(model_cfg.arch), f"model.arch of '{model_cfg.name}'")
    config = Path(model_cfg.path).expanduser() / "config.json"
    if model_cfg.gguf_file and not config.is_file():  # a GGUF preset: its dequantized copy, once made
        config = MODEL_CACHE_DIR / Path(model_cfg.gguf_file).stem / "config.json"
    if not config.is_file():
        raise UserError(
            f"model.path={model_cfg.path} has no config.json here: the estimate reads the model's config.json; "
            "download the model (or just its config.json) and set model.path=<local dir>"
        )
    return shape_of(json.loads(config.read_text()), str(config))


@dataclass(frozen=True)
class MemoryInputs:
    shape: ModelShape
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    gpus_per_node: int
    nodes: int
    sequences: int
    """Sequences per micro-batch on one GPU (DPO/ORPO: 2 x the batch, chosen and rejected)."""
    seq_length: int
    checkpointing: bool
    eager_attention: bool
    reference_model: bool


@dataclass(frozen=True)
class MemoryEstimate:
    inputs: MemoryInputs
    model_states: int
    activations: int
    reference: int
    cpu_per_node: int

    @property
    def per_gpu(self) -> int:
        return self.model_states + self.activations + self.reference


def model_state_bytes(inputs: MemoryInputs):
    """(GPU bytes, CPU bytes per node) of params, grads and optimizer states: DeepSpeed's estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, gpus = inputs.shape.params, inputs.gpus_per_node
    if inputs.zero_stage == 3:
        offload = inputs.offload_optimizer or inputs.offload_param
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, inputs.shape.largest_layer_params, gpus, inputs.nodes,
            cpu_offload=offload, cpu_offload_params=inputs.offload_param)
        return gpu, cpu
    # Stage 1 partitions less than stage 2 (gradients stay whole): the stage-2 figure is a lower
    # bound for it. Stage 0 partitions nothing: one GPU's figure.
    world = (gpus, inputs.nodes) if inputs.zero_stage else (1, 1)
    cpu, gpu = estimate_zero2_model_states_mem_needs(params, *world, cpu_offload=inputs.offload_optimizer)
    return gpu, cpu


def activation_bytes(inputs: MemoryInputs) -> int:
    """The formula in the module docstring."""
    s, h, b = inputs.seq_length, inputs.shape.hidden, inputs.sequences
    layer = 34 * b * s * h + (5 * inputs.shape.heads * s * s * b if inputs.eager_attention else 0)
    layers = inputs.shape.layers * 2 * b * s * h + layer if inputs.checkpointing else inputs.shape.layers * layer
    return layers + 6 * b * s * inputs.shape.vocab


def estimate(inputs: MemoryInputs) -> MemoryEstimate:
    gpu, cpu = model_state_bytes(inputs)
    reference = 0
    if inputs.reference_model:
        share = inputs.gpus_per_node * inputs.nodes if inputs.zero_stage == 3 else 1
        reference = 0 if inputs.offload_param else 2 * inputs.shape.params // share
    return MemoryEstimate(inputs, gpu, activation_bytes(inputs), reference, cpu)


def inputs_for_config(cfg, gpus_per_node: int, nodes: int) -> MemoryInputs:
    """The estimate's inputs from the resolved training config."""
    preference = cfg.stage.name in ("dpo", "orpo")
    return MemoryInputs(
        shape=model_shape(cfg.model), zero_stage=int(cfg.deepspeed.zero_stage),
        offload_optimizer=bool(cfg.deepspeed.offload_optimizer), offload_param=bool(cfg.deepspeed.offload_param),
        gpus_per_node=gpus_per_node, nodes=nodes,
        sequences=cfg.training.per_device_train_batch_size * (2 if preference else 1),
        seq_length=cfg.stage.max_length if preference else cfg.training.max_seq_length,
        checkpointing=bool(cfg.training.gradient_checkpointing),
        eager_attention=cfg.model.attn_implementation == "eager",
        reference_model=cfg.stage.name == "dpo" and not cfg.stage.precompute_ref_log_probs,
    )


def estimate_for_config(cfg, gpus_per_node: int, nodes: int) -> MemoryEstimate:
    return estimate(inputs_for_config(cfg, gpus_per_node, nodes))


def remedies(inputs: MemoryInputs) -> List[tuple]:
    """(override, the inputs it gives with every earlier remedy applied), cheapest in speed first."""
    options = []
    if not inputs.checkpointing:
        inputs = dataclasses.replace(inputs, checkpointing=True)
        options.append(("training.gradient_checkpointing=true", inputs))
    smallest = 2 if inputs.reference_model or inputs.sequences % 2 else 1
    while inputs.sequences > smallest and inputs.sequences % 2 == 0:
        inputs = dataclasses.replace(inputs, sequences=inputs.sequences // 2)
        options.append((f"{inputs.sequences} sequence(s) per micro-batch (lower training.per_device_train_batch_size, "
                        "raise gradient_accumulation_steps to keep the global batch)", inputs))
    if inputs.zero_stage < 3:
        inputs = dataclasses.replace(inputs, zero_stage=3)
        options.append(("deepspeed=zero3", inputs))
    if not (inputs.offload_optimizer and inputs.offload_param):
        inputs = dataclasses.replace(inputs, zero_stage=3, offload_optimizer=True, offload_param=True)
        options.append(("deepspeed=zero3_offload", inputs))
    return options


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def format_estimate(result: MemoryEstimate, gpu_memory_gib: Optional[float]) -> str:
    i = result.inputs
    offload = "+".join(name for name, on in (("optimizer", i.offload_optimizer), ("params", i.offload_param)) if on)
    lines = [
        f"memory estimate per GPU: {i.shape.params / 1e9:.2f}B params, ZeRO-{i.zero_stage}"
        f"{f' offload {offload}' if offload else ''}, {i.nodes} node(s) x {i.gpus_per_node} GPU(s), "
        f"{i.sequences} sequence(s) x {i.seq_length} tokens per micro-batch, "
        f"gradient checkpointing {'on' if i.checkpointing else 'off'}",
        f"  model states (DeepSpeed's estimator): {gib(result.model_states)}",
        f"  activations + logits (estimate):      {gib(result.activations)}",
    ]
    if result.reference:
        lines.append(f"  DPO reference model (16-bit):        {gib(result.reference)}")
    lines += [f"  total per GPU:                        {gib(result.per_gpu)} (+1-3 GiB CUDA context and buffers)",
              f"  CPU memory per node (DeepSpeed):      {gib(result.cpu_per_node)}",
              "  (full fine-tuning; training.finetune=lora|qlora needs far less for model states)"]
    if gpu_memory_gib is not None:
        lines.append(fit_verdict(result, gpu_memory_gib))
    return "\n".join(lines) + "\n"


def fit_verdict(result: MemoryEstimate, gpu_memory_gib: float) -> str:
    """Whether it fits; if not, the remedies in order, each on top of the ones before, up to the first that fits."""
    budget = gpu_memory_gib * GIB
    if result.per_gpu <= budget:
        return f"fits: {gib(result.per_gpu)} of {gpu_memory_gib:g} GiB ({gib(budget - result.per_gpu)} to spare)"
    steps = []
    for override, changed in remedies(result.inputs):
        total = estimate(changed).per_gpu
        steps.append(f"{override} -> {gib(total)}")
        if total <= budget:
            break
    else:
        steps.append("then more GPUs (--gpus/--nodes) or a shorter sequence length")
    return (f"does NOT fit: {gib(result.per_gpu)} > {gpu_memory_gib:g} GiB; try, in order (each on top of the "
            "last): " + "; ".join(steps))
