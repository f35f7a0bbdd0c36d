"""DPO's frozen reference model and its log-probs cached on disk (train/stages/dpo.py chooses
between them): the reference is `stage.ref_model_path`, else a copy of the starting model; with
`stage.precompute_ref_log_probs=true` its log-probs are computed once and kept in one file, keyed
by the reference model and the tokenized data, that every rank, node and rerun reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional

import pyarrow.compute as pc
import torch
import trl
from accelerate.utils import broadcast_object_list
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from trl import DPOTrainer
from trl.models import prepare_deepspeed

from core.errors import UserError
from core.outputs import MODEL_CACHE_DIR, is_model_dir
from train.model import load_model, report_parameter_share, resolve_model_dir

REF_LOGPS_DIR = MODEL_CACHE_DIR / "ref_logps"


# ---------------------------------------------------------------------------------------------
# reference model
# ---------------------------------------------------------------------------------------------
def reference_dir(cfg) -> Optional[Path]:
    """The reference model's directory; None: the random-init starting model (tiny preset)."""
    if cfg.stage.ref_model_path:
        path = Path(cfg.stage.ref_model_path).expanduser()
        if not is_model_dir(path):
            raise UserError(
                f"stage.ref_model_path={cfg.stage.ref_model_path} is not a model directory (no config.json): "
                "point it at a directory written by save_pretrained, or drop it to use the starting model"
            )
        return path
    return resolve_model_dir(cfg.model)


def reference_identity(cfg) -> dict:
    """What the reference log-probs depend on besides the data. Weight files are identified by
    name, size and mtime: hashing the contents of a 16 GB checkpoint would cost minutes."""
    ref_dir = reference_dir(cfg)
    if ref_dir is None:
        return {
            "random_init": OmegaConf.to_container(cfg.model.arch, resolve=True),
            "seed": cfg.training.seed,
            "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        }
    files = sorted(p for p in ref_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return {
        "path": str(ref_dir.resolve()),
        "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
    }


def copy_initial_weights(policy, reference) -> None:
    """reference <- policy. Under ZeRO-3 both are partitioned the same way, so each rank copies its
    own shard: no gather, and never a full copy of the model in memory."""
    pairs = list(zip(policy.named_parameters(), reference.named_parameters()))
    for (name, src), (ref_name, dst) in pairs:
        assert name == ref_name, (name, ref_name)
        with torch.no_grad():
            if hasattr(src, "ds_tensor"):
                dst.ds_tensor.copy_(src.ds_tensor)
            else:
                dst.copy_(src)


def build_reference(cfg, policy, tokenizer):
    """The frozen reference: loaded from its directory, or a copy of a random-init policy."""
    ref_dir = reference_dir(cfg)
    reference = load_model(cfg.model, policy.dtype, tokenizer, path=str(ref_dir) if ref_dir else None)
    if ref_dir is None:
        copy_initial_weights(policy, reference)
    report_parameter_share(reference, "reference model")
    return reference


# ---------------------------------------------------------------------------------------------
# reference log-prob cache
# ---------------------------------------------------------------------------------------------
def token_fingerprint(dataset) -> str:
    """sha256 of the tokenized pairs, in dataset order (covers data, tokenizer, template, truncation)."""
    table = dataset.with_format("arrow")[:]
    h = hashlib.sha256()
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = table.column(column).combine_chunks()
        h.update(pc.list_value_length(ids).to_numpy(zero_copy_only=False).tobytes())
        h.update(pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return h.hexdigest()


def ref_logps_cache_path(cfg, dataset, args, dtype) -> Path:
    key = {
        "reference": reference_identity(cfg),
        "data": token_fingerprint(dataset),
        "max_length": args.max_length,
        "ld_alpha": args.ld_alpha,
        "dtype": str(dtype),
        "attn_implementation": cfg.model.attn_implementation,
        "trl": trl.__version__,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return REF_LOGPS_DIR / f"{digest}.safetensors"


class CachedReferenceDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer on data train/data/preference.py already tokenized, with the precomputed
    reference log-probs cached in one file shared by every rank, node and rerun.

    TRL 1.16 caches them beside the dataset's own cache files (a per-process temp dir for
    in-memory data, so ranks cannot share it) and keys them by a hash of the model's
    state_dict, which under ZeRO-3 holds only empty partitioned placeholders; hence our own.
    """

    def __init__(self, *args, ref_logps_caches: Optional[Dict[str, Path]] = None, **kwargs):
        self.ref_logps_caches = ref_logps_caches or {}  # "train"/"eval" -> file
        self.ref_logps_source = None  # "cache" or "computed", for logs and tests
        super().__init__(*args, **kwargs)
        if self.precompute_ref_logps and self.ref_model is not None:
            self.ref_model = None  # the loss reads the cached columns; free the reference

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized and truncated by train/data/preference.py

    def _precompute_ref_logps(self, dataset, name, batch_size):
        path = self.ref_logps_caches.get(name)
        cached = [None]
        if self.accelerator.is_main_process and path is not None and path.is_file():
            tensors = load_file(path)  # keyed by the tokenized rows, so it has one value per row
            cached = [(tensors["chosen"], tensors["rejected"])]
        broadcast_object_list(cached, from_process=0)  # one decision for every rank and node
        if cached[0] is not None:
            chosen, rejected = cached[0]
            self.ref_logps_source = "cache"
        else:
            chosen, rejected = self._compute_ref_logps(dataset, batch_size)
            if self.accelerator.is_main_process and path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp-{os.getpid()}")
                save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp))
                os.replace(tmp, path)  # atomic: a killed run never leaves half a cache
            self.accelerator.wait_for_everyone()
            self.ref_logps_source = "computed"
        if self.accelerator.is_main_process:
            verb = "loaded from" if self.ref_logps_source == "cache" else "computed and cached in"
            print(f"reference log-probs for {len(dataset)} pairs {verb} {path}", flush=True)
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        return dataset.add_column("ref_rejected_logps", rejected.tolist())

    def _compute_ref_logps(self, dataset, batch_size):
        """TRL's precompute loop: batches sharded over ranks, gathered back in dataset order."""
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        )
        if self.ref_model is not None:
            model = self.ref_model
        elif self.is_deepspeed_enabled:
            # The policy before its first step is the reference; under ZeRO-3 it is still partitioned,
            # so run it through a DeepSpeed inference engine that gathers the shards (as TRL does).
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.model
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.compute_ref_log_probs(model, batch)
            c, r = self.accelerator.gather_for_metrics((c, r))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return torch.cat(chosen), torch.cat(rejected)
