"""TRL's SFTTrainer with the model's own LM head on CPU ranks.

TRL 1.16's SFTTrainer scores tokens with its fused LM head (`add_fused_lm_head`): on GPUs a
Triton kernel, on the CPU a torch fallback that never builds the [tokens, vocab] logits,
recomputes them in the backward and runs the head's two gradient GEMMs in fp32. Measured on
a 2-core Xeon with AMX (docs/BENCHMARKS.md, "CPT at each precision on the CPU"): that fallback
took 36% of a bf16 SmolLM2-135M CPT step, and the project ran at 0.60x a bare PyTorch loop.

On CPU ranks the fused call is answered here from the model's own forward instead: the full
logits once, in the run's precision (bf16 GEMMs on the CPU's bf16 units), log-softmax in fp32
as the model's own loss does, and the same FusedCausalLMOutput fields TRL's compute_loss reads
(log_probs with gradient; entropy, is_top1 and label_mask without), so its loss (sum of the
label tokens' NLL / num_items_in_batch, gradient accumulation, average_tokens_across_devices),
its metrics and the mixed stage's per-kind losses (train/stages/mixed.py) are unchanged.
GPU ranks keep TRL's fused kernel.

Memory: the logits are [batch * seq, vocab] in the run's dtype plus their fp32 log-softmax and
its gradient: at SmolLM2's 2 x 1024 tokens and 49,152 words, 200 MB (bf16) + 2 x 400 MB. That is
what the model's own loss costs too, and small on a CPU host; it is what the fused head exists
to avoid on a GPU.
"""

from __future__ import annotations

import functools
import types

import torch
from accelerate.utils import is_peft_model
from trl import SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput

IGNORE_INDEX = -100
ENTROPY_ROWS = 256  # rows of fp32 probabilities the entropy builds at a time: [256, vocab], 50 MB at 49k words


class SFTTrainerWithCpuLogits(SFTTrainer):
    """SFTTrainer whose fused LM head (added in SFTTrainer.__init__) is the model's own on CPU ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.device.type == "cpu":
            # the model TRL gave the fused head
            answer_fused_calls_from_full_logits(self.model.get_base_model() if is_peft_model(self.model) else self.model)


def answer_fused_calls_from_full_logits(model) -> None:
    """Make `model(..., labels=..., fused_lm_head=True)` compute the full logits with the model's
    own forward and derive TRL's per-token fields from them. Call after `add_fused_lm_head`."""
    trl_forward = model.forward  # TRL's: its own head with fused_lm_head=True, the model's forward without
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        moe = kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False)
        if not fused_lm_head or moe:  # MoE: TRL's head adds the load-balancing loss
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        logits = trl_forward(*args, **kwargs).logits  # [batch, seq, vocab], scaled/soft-capped by the model
        if shift_labels is None:  # token t predicts t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:  # pre-shifted (context/sequence parallelism)
            labels = shift_labels
        log_probs, entropy, is_top1, mask = score_tokens(logits, labels.to(logits.device))
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def score_tokens(logits: torch.Tensor, labels: torch.Tensor):
    """Per-token log p(label) (with gradient), entropy and whether the label is the argmax (without),
    and the label mask; all [batch, seq] and zero where the label is IGNORE_INDEX, as TRL's head gives them."""
    mask = labels != IGNORE_INDEX
    log_softmax = torch.log_softmax(logits.float(), dim=-1)  # [batch, seq, vocab] fp32, as the model's own loss
    log_probs = log_softmax.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    with torch.no_grad():
        entropy = token_entropy(log_softmax.detach()).masked_fill_(~mask, 0.0)
        # argmax takes the first of tied maxima, as TRL's head counts a tie with an earlier word as a
        # miss; a masked label (-100) never matches
        is_top1 = logits.detach().argmax(-1) == labels
    return log_probs, entropy, is_top1, mask


def token_entropy(log_softmax: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log p_v over the last dimension, ENTROPY_ROWS rows at a time (no [tokens, vocab] temporary)."""
    rows = log_softmax.reshape(-1, log_softmax.size(-1))
    entropy = torch.empty(rows.size(0), dtype=rows.dtype, device=rows.device)
    for start in range(0, rows.size(0), ENTROPY_ROWS):
        chunk = rows[start:start + ENTROPY_ROWS]
        entropy[start:start + ENTROPY_ROWS] = -(chunk.exp() * chunk).sum(-1)
    return entropy.view(log_softmax.shape[:-1])
