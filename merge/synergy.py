"""Score a merged model against its parents, as the paper does (Lu, Luu & Buehler, 2409.03444).

Each model gets a score P on the same domain preference set; the merge is compared with the
parents' mean E = (P1 + P2) / 2 (the score a merge "should" get) and with max(P1, P2). The
paper's Llama-8B and Mistral-7B merges beat both parents; its SmolLM-1.7B merges did not.

Two scores, both higher-is-better:
- `accuracy`: the share of pairs where the model gives the chosen answer a higher total
  log-probability than the rejected one (ties count half). The bundled pairs differ in the
  fact that matters (the rejected answer is plausible but wrong), so this is a domain-knowledge
  test that needs no generation and no judge.
- `answer_logprob`: mean log-probability per token of the chosen answers.

Pairs are rendered with each model's own chat template (TRL's DPO tokenization, shared with the
preference stages). One model is loaded at a time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from core.errors import UserError

SCORES = ("accuracy", "answer_logprob")


@dataclass(frozen=True)
class Score:
    accuracy: float
    answer_logprob: float
    pairs: int


def completion_logprobs(model, pairs: Sequence[Tuple[List[int], List[int]]], pad_id: int,
                        batch_size: int = 8) -> List[Tuple[float, int]]:
    """(Σ log p(completion | prompt), completion tokens) for each (prompt_ids, completion_ids).

    Sequences are batched by length and right-padded; padding sits after every real token, so
    with the attention mask it changes no real position's logits."""
    import torch

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: List[Optional[Tuple[float, int]]] = [None] * len(pairs)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            seqs = [pairs[i][0] + pairs[i][1] for i in batch]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            target = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions whose next token is scored
            for row, i in enumerate(batch):
                prompt, completion = pairs[i]
                ids[row, : len(seqs[row])] = torch.tensor(seqs[row])
                mask[row, : len(seqs[row])] = 1
                target[row, len(prompt) - 1 : len(prompt) + len(completion) - 1] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            # log_softmax only where a completion token is predicted: [tokens, vocab], not [B, L, vocab]
            picked = logits[target.to(device)].float().log_softmax(-1)
            next_ids = ids[:, 1:][target[:, :-1]].to(device)
            token_lp = picked.gather(-1, next_ids[:, None])[:, 0].double().cpu()
            counts = target.sum(1).tolist()
            for row, (i, chunk) in enumerate(zip(batch, token_lp.split(counts))):
                out[i] = (float(chunk.sum()), counts[row])
    return out  # type: ignore[return-value]


def score_pairs(chosen: Sequence[Tuple[float, int]], rejected: Sequence[Tuple[float, int]]) -> Score:
    """The two scores from per-pair (log-prob sum, tokens) of the chosen and rejected answers."""
    wins = sum(1.0 if c[0] > r[0] else 0.5 if c[0] == r[0] else 0.0 for c, r in zip(chosen, rejected))
    return Score(
        accuracy=wins / len(chosen),
        answer_logprob=sum(c[0] for c in chosen) / sum(c[1] for c in chosen),
        pairs=len(chosen),
    )


def score_model(model_dir: Path, conversations: List[dict], batch_size: int = 8,
                fallback_tokenizer: Optional[Path] = None) -> Score:
    """Load one model (float32, CPU or its default device), score every pair, free it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.preference import tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        if fallback_tokenizer is None:
            raise UserError(f"{model_dir} has no chat template: the pairs are rendered as chats")
        tokenizer = AutoTokenizer.from_pretrained(fallback_tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenize_conversation(conv, tokenizer) for conv in conversations]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    try:
        chosen = completion_logprobs(model, [(r["prompt_ids"], r["chosen_ids"]) for r in rows], pad_id, batch_size)
        rejected = completion_logprobs(model, [(r["prompt_ids"], r["rejected_ids"]) for r in rows], pad_id,
                                       batch_size)
    finally:
        del model
    return score_pairs(chosen, rejected)


def synergy(parents: Sequence[float], merged: float) -> Dict[str, float]:
    """The paper's comparison: E = mean of the parents, and the best parent."""
    expected = sum(parents) / len(parents)
    best = max(parents)
    return {"merged": merged, "expected": expected, "best_parent": best,
            "over_expected": merged - expected, "over_best": merged - best}


def verdict(s: Dict[str, float]) -> str:
    if s["over_best"] > 0:
        return "beats both parents"
    if s["over_best"] == 0:
        return "ties the best parent"
    if s["over_expected"] > 0:
        return "beats the parents' mean, not the best parent"
    return "at or below the parents' mean"


def parents_of(merged_dir: Path) -> List[str]:
    """The models a domainforge (or mergekit) merge was made from, from its mergekit_config.yml."""
    path = merged_dir / "mergekit_config.yml"
    if not path.is_file():
        raise UserError(f"{merged_dir} holds no mergekit_config.yml to read the parents from: pass --parents P1 P2")
    spec = yaml.safe_load(path.read_text()) or {}
    names: List[str] = []
    for entry in spec.get("models") or []:
        names.append(entry["model"])
    for piece in spec.get("slices") or []:
        names.extend(src["model"] for src in piece.get("sources", []))
    unique = list(dict.fromkeys(str(n) for n in names))
    if len(unique) < 2:
        raise UserError(f"{path} names fewer than two models: pass --parents P1 P2")
    return unique


def check_model_dir(path: Path, role: str) -> Path:
    from core.outputs import is_model_dir

    if not is_model_dir(path):
        raise UserError(f"{role} {path} is not a model directory (no config.json): give a saved model's directory")
    return path


def run_synergy(merged_dir: str, parents: Optional[List[str]], data_path: str, max_samples: Optional[int],
                batch_size: int, json_out: Optional[str]) -> Dict[str, object]:
    """Score the parents and the merge, print the comparison, optionally write it as JSON."""
    from train.config import DatasetConfig
    from train.data import load_rows
    from train.preference import to_conversation

    merged = check_model_dir(Path(merged_dir), "the merged model")
    parent_dirs = [check_model_dir(Path(p), "parent model") for p in (parents or parents_of(merged))]
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give at least 1")
    rows = load_rows(DatasetConfig(path=data_path, max_samples=max_samples), "preference", key="--data")
    conversations = [to_conversation(dict(row), i, data_path) for i, row in enumerate(rows)]

    models = [*((f"parent {i + 1}", p) for i, p in enumerate(parent_dirs)), ("merged", merged)]
    scores: Dict[str, Score] = {}
    for role, path in models:
        print(f"scoring {role}: {path}", flush=True)
        scores[role] = score_model(path, conversations, batch_size, fallback_tokenizer=merged)

    parent_scores = [scores[role] for role, _ in models[:-1]]
    report = {
        "data": data_path,
        "pairs": len(conversations),
        "models": {role: {"path": str(path), **asdict(scores[role])} for role, path in models},
        "synergy": {name: synergy([getattr(s, name) for s in parent_scores], getattr(scores["merged"], name))
                    for name in SCORES},
    }
    print(format_report(report), flush=True)
    if json_out:
        from merge.run import write_atomic

        write_atomic(Path(json_out).resolve(), json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: Dict[str, object]) -> str:
    lines = [f"{'model':<10} {'accuracy':>9} {'answer log-prob/token':>22}  path"]
    for role, m in report["models"].items():  # type: ignore[union-attr]
        lines.append(f"{role:<10} {m['accuracy']:>9.4f} {m['answer_logprob']:>22.4f}  {m['path']}")
    for name in SCORES:
        s = report["synergy"][name]  # type: ignore[index]
        lines.append(f"{name}: merged {s['merged']:.4f}, E=mean(parents) {s['expected']:.4f} "
                     f"({s['over_expected']:+.4f}), best parent {s['best_parent']:.4f} ({s['over_best']:+.4f}): "
                     f"{verdict(s)}")
    return "\n".join(lines)
