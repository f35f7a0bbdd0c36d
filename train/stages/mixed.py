"""Mixed training: raw text (loss on every token) and chat Q&A (loss on the answers only) in
one run, mixed as `data.mixed.sources` sets, through TRL's SFTTrainer; the log adds each kind's
loss (`loss_text`, `loss_chat`, and `eval_` ones with an eval split) and the loss tokens each
kind has trained on so far (`tokens_text`, `tokens_chat`, summed over the ranks).

    deepspeed launch/train.py +stage=mixed
    deepspeed launch/train.py +stage=mixed data.mixed.sources.0.weight=3 data.mixed.sources.1.weight=1

The per-kind loss is read off the forward the trainer already makes: TRL's fused LM head (on
CPU ranks the model's own, train/cpu_lm_head.py) returns each token's log-probability, and a
forward hook sums them by the kind each token carries (train/data/mixed.py), so it costs no
extra pass and is the loss the model trains on.
"""

from __future__ import annotations

import torch

from train.cpu_lm_head import SFTTrainerWithCpuLogits
from train.data.mixed import KIND_NAMES, LOSS_KIND, prepare_mixed
from train.stages.sft import PretokenizedSFTStage


class KindLossTrainer(SFTTrainerWithCpuLogits):
    """SFTTrainer that logs the loss of each kind of example (text, chat) separately."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._batch_kinds = None  # LOSS_KIND of the batch being scored: [batch, seq]
        self._window = {mode: torch.zeros(2, len(KIND_NAMES), dtype=torch.float64) for mode in ("train", "eval")}
        self._tokens_seen = torch.zeros(len(KIND_NAMES), dtype=torch.float64)
        self.model.register_forward_hook(self._record_kind_losses, with_kwargs=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._batch_kinds = inputs.pop(LOSS_KIND)
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self._batch_kinds = None

    @torch.no_grad()
    def _record_kind_losses(self, module, args, kwargs, output):
        log_probs = getattr(output, "log_probs", None)
        if log_probs is None or self._batch_kinds is None:
            return  # a generation or a forward without the fused head: nothing to score
        kinds = self._batch_kinds[:, 1:].to(log_probs.device)  # token t predicts t+1, as the labels are shifted
        window = self._window["train" if self.model.training else "eval"]
        for kind in KIND_NAMES:
            mine = output.label_mask & (kinds == kind)
            window[0, kind] += float(-log_probs[mine].double().sum())
            window[1, kind] += float(mine.sum())

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        # Every rank logs (the trainer's loss is gathered the same way), so the sum is collective.
        window = self.accelerator.reduce(self._window[mode].to(self.accelerator.device), "sum").cpu()
        self._window[mode].zero_()
        prefix = "eval_" if mode == "eval" else ""
        if mode == "train":
            self._tokens_seen += window[1]
        for kind, name in KIND_NAMES.items():
            if window[1, kind] > 0:
                logs[f"{prefix}loss_{name}"] = round(float(window[0, kind] / window[1, kind]), 4)
            if mode == "train":
                logs[f"tokens_{name}"] = int(self._tokens_seen[kind])
        super().log(logs, start_time)


class MixedStage(PretokenizedSFTStage):
    def build_trainer(self, cfg, args, model, tokenizer, data, callbacks):
        if data.stats.get("packed_epochs", 1) > 1:
            args.num_train_epochs = 1  # the epochs are in the data, each in its own order (train/data/mixed.py)
        return super().build_trainer(cfg, args, model, tokenizer, data, callbacks)


HOOKS = MixedStage("mixed", prepare_mixed, KindLossTrainer)
