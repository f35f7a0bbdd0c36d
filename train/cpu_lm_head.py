"""TRL's SFTTrainer with the model's own LM head on CPU ranks.

TRL 1.16's SFTTrainer scores tokens with its fused LM head (`add_fused_lm_head`): on GPUs a
Triton kernel, on the CPU a torch fallback that never builds the [tokens, vocab] logits,
recomputes them in the backward and runs the head's two gradient GEMMs in fp32. Measured on
a 2-core Xeon with AMX (docs/BENCHMARKS.md, "CPT at each precision on the CPU"): that fallback
took 36% of a bf16 SmolLM2-135M CPT step, and the project ran at 0.60x a bare PyTorch loop;
with the head below (and the one-rank gradient shortcut in train/runtime.py), 407 tokens/s in
bf16 and 1.00x the bare loop in fp32.

On CPU ranks the fused call is answered here from the model's own forward instead: the full
logits once, in the run's precision (bf16 GEMMs on the CPU's bf16 units, as a bare loop runs
them), then the log-softmax statistics in fp32 a few rows at a time (TokenScores), giving the
FusedCausalLMOutput fields TRL's compute_loss reads (log_probs with gradient; entropy, is_top1
and label_mask without). Its loss (sum of the label tokens' NLL / num_items_in_batch, gradient
accumulation, average_tokens_across_devices), its metrics and the mixed stage's per-kind losses
(train/stages/mixed.py) are unchanged. GPU ranks keep TRL's fused kernel.

Memory: the logits [batch * seq, vocab] in the run's dtype, kept for the backward, and their
gradient of the same size: at SmolLM2's 2 x 1024 tokens and 49,152 words, 2 x 200 MB in bf16
(2 x 400 MB in fp32), less than the model's own loss, which also makes an fp32 copy. Small on
a CPU host; on a GPU it is what the fused head exists to avoid.
"""

from __future__ import annotations

import functools
import types

import torch
from accelerate.utils import is_peft_model
from trl import SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput

IGNORE_INDEX = -100
ROWS = 32  # rows of fp32 temporaries at a time: [32, vocab], 6 MB at 49k words


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
        if shift_labels is None:  # token t predicts t + 1; the last position predicts nothing
            labels = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
        else:  # pre-shifted (context/sequence parallelism)
            labels = shift_labels
        log_probs, entropy, is_top1, mask = score_tokens(logits, labels.to(logits.device))
        if shift_labels is None:
            log_probs, entropy, is_top1, mask = (x[:, :-1] for x in (log_probs, entropy, is_top1, mask))
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def score_tokens(logits: torch.Tensor, labels: torch.Tensor):
    """Per-token log p(label) (with gradient), entropy and whether the label is the argmax (without),
    and the label mask; all [batch, seq] and zero where the label is IGNORE_INDEX, as TRL's head gives them."""
    mask = labels != IGNORE_INDEX
    flat_logits = logits.view(-1, logits.size(-1))  # [batch * seq, vocab], no copy
    log_probs, entropy, is_top1 = TokenScores.apply(flat_logits, labels.reshape(-1))
    shape = labels.shape
    return (log_probs.view(shape).masked_fill(~mask, 0.0), entropy.view(shape).masked_fill_(~mask, 0.0),
            is_top1.view(shape), mask)


class TokenScores(torch.autograd.Function):
    """log p(label), entropy and is-top-1 of each row of [tokens, vocab] logits, in fp32, ROWS rows
    at a time: the fp32 temporaries stay small (ROWS x vocab) where a log-softmax over the whole
    batch writes and re-reads 400 MB (at 2 x 1024 x 49k) on every pass, and the exponentials are
    taken once in the forward and once in the backward. Only log p(label) has a gradient."""

    @staticmethod
    def forward(ctx, logits, labels):  # logits [N, V] in the run's dtype, labels [N] (IGNORE_INDEX allowed)
        targets = labels.clamp(min=0).unsqueeze(-1)  # [N, 1]
        log_z = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        log_probs, entropy = torch.empty_like(log_z), torch.empty_like(log_z)
        is_top1 = torch.empty(logits.size(0), dtype=torch.bool, device=logits.device)
        for rows in row_chunks(logits.size(0)):
            z = logits[rows].float()
            top, argmax = z.max(-1)  # max returns the first of tied maxima, as TRL's head counts a tie as a miss
            exp = (z - top.unsqueeze(-1)).exp_()
            sum_exp = exp.sum(-1)
            log_z[rows] = top + sum_exp.log()
            log_probs[rows] = z.gather(-1, targets[rows]).squeeze(-1) - log_z[rows]
            entropy[rows] = log_z[rows] - (exp * z).sum(-1) / sum_exp
            is_top1[rows] = argmax == labels[rows]  # a masked label (-100) never matches
        ctx.save_for_backward(logits, targets, log_z)
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *_):
        logits, targets, log_z = ctx.saved_tensors
        grad = torch.empty_like(logits)
        grad_log_probs = grad_log_probs.float().unsqueeze(-1)  # [N, 1]
        for rows in row_chunks(logits.size(0)):
            # d log p_target / dz_j = 1[j = target] - p_j
            g = (logits[rows].float() - log_z[rows].unsqueeze(-1)).exp_().mul_(-grad_log_probs[rows])
            grad[rows] = g.scatter_add_(-1, targets[rows], grad_log_probs[rows])
        return grad, None


def row_chunks(n: int):
    for start in range(0, n, ROWS):
        yield slice(start, min(start + ROWS, n))
