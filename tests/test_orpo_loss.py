"""ORPO through the real trainer path (train/stages/orpo.py around TRL's experimental
ORPOTrainer) against the loss written out by hand from raw logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bench.preference_harness import batch_of, compose, trainer_for

BETA = 0.25  # not the default, so a λ that is ignored or hard-coded shows


def orpo_loss_by_hand(logits, labels, beta):
    """L = NLL(chosen answer) − β·mean(log σ(log odds(chosen) − log odds(rejected))),
    log odds(p) = log p − log(1 − p), p = exp(mean answer-token log-prob).
    logits [2B, T, V] with chosen rows first; labels [2B, T], -100 off the answer."""
    logps = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    token_logps = logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    mean_logps = token_logps.sum(-1) / mask.sum(-1)
    chosen, rejected = mean_logps.chunk(2)

    def log_odds(lp):
        return lp - torch.log(1 - torch.exp(lp))

    b = chosen.shape[0]
    nll = -token_logps[:b].sum() / mask[:b].sum()
    return nll - beta * F.logsigmoid(log_odds(chosen) - log_odds(rejected)).mean()


def padded(rows, length, value):
    return torch.stack([F.pad(r, (0, length - r.shape[0]), value=value) for r in rows])


def test_orpo_loss_matches_the_formula(tmp_path):
    cfg = compose("orpo", f"stage.beta={BETA}")
    _, trainer = trainer_for(cfg, tmp_path)
    batch = batch_of(trainer, [0, 1, 2])
    model = trainer.model
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)

        # the same pairs, built independently from the tokenized rows
        rows = [trainer.train_dataset[i] for i in (0, 1, 2)]
        seqs, labels = [], []
        for side in ("chosen", "rejected"):
            for r in rows:
                seqs.append(torch.tensor(r["prompt_ids"] + r[f"{side}_ids"]))
                labels.append(torch.tensor([-100] * len(r["prompt_ids"]) + r[f"{side}_ids"]))
        T = max(s.shape[0] for s in seqs)
        input_ids = padded(seqs, T, trainer.processing_class.pad_token_id)
        attention = padded([torch.ones_like(s) for s in seqs], T, 0)
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        expected = orpo_loss_by_hand(logits, padded(labels, T, -100), BETA)

    assert abs(loss.item() - expected.item()) < 1e-5, (loss.item(), expected.item())
    # the odds-ratio term is really in there: λ=0 would give the NLL alone
    assert abs(expected.item() - orpo_loss_by_hand(logits, padded(labels, T, -100), 0.0).item()) > 1e-3


def test_orpo_logs_the_preference_metrics(tmp_path):
    cfg = compose("orpo")
    _, trainer = trainer_for(cfg, tmp_path)
    trainer.compute_loss(trainer.model, batch_of(trainer, [0, 1]))
    logged = set(trainer._stored_metrics["train"])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "log_odds_ratio", "nll_loss"):
        assert key in logged, sorted(logged)
