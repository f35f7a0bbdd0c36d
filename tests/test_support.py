"""The GPU suite's QLoRA reference (tests/support/gpu.py) is what the libraries hold."""

from __future__ import annotations

import pytest


def test_qlora_merge_reference_is_what_bitsandbytes_and_peft_hold(tmp_path):
    """The GPU suite's QLoRA check (tests/support/gpu.py) against the libraries themselves, on
    their CPU backends: its base is what a 4-bit load's Linear4bit dequantizes to, its delta PEFT's
    get_delta_weight, for every 4-bit layer, with and without adapters."""
    pytest.importorskip("bitsandbytes")
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.support.gpu import qlora_merge_reference
    from tests.support.models import tiny_llama

    base = tiny_llama(tmp_path / "base", layers=2, dtype="float32", shard=None)
    quantized = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32))
    model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=False))  # random A and B: a non-zero delta
    model.save_pretrained(tmp_path / "adapter")
    reference = qlora_merge_reference(base, tmp_path / "adapter", "nf4", True)

    held = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            plain = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"
            lora = model.get_submodule(name.removesuffix(".base_layer"))
            delta = lora.get_delta_weight("default") if hasattr(lora, "lora_A") else torch.zeros(())
            held[plain] = (dequantize_4bit(module.weight.data, module.weight.quant_state).float(), delta.float())
    assert sorted(reference) == sorted(held) and len(held) == 2 * 7
    for name, (base_weight, delta) in held.items():
        assert torch.equal(reference[name][0], base_weight), name
        assert torch.allclose(reference[name][1], delta.expand_as(base_weight), atol=1e-7), name
    assert reference["model.layers.0.mlp.down_proj.weight"][1].abs().max() > 1e-3
