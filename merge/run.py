"""Run a merge: plan, split the output shards across workers, stream, verify, publish.

Crash safety: everything is written into a hidden sibling `.<OUT_DIR>.partial/`. A shard
counts as complete only when `<shard>.done` holds this merge's fingerprint, written after the
shard was fsynced and its header re-read; a rerun keeps complete shards. Worker 0 writes the
index, config, tokenizer and card once every shard is complete, then renames the directory
into place, so OUT_DIR either does not exist or holds a finished model.

`Merge` is the state every worker plans alike; merge/stream.py streams the tensors into the
shards, merge/workers.py runs the workers (forked here, or independent ones under SLURM) and
merge/publish.py writes the rest of the model and renames it into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from core.errors import UserError
from core.lock import OutputLock
from core.validate import check_value, writable_dir
from core.wandb_runs import log_wandb_run
from merge import methods
from merge.config import MergeOptions
from merge.io import ModelReader
from merge.plan import MergePlan, plan_merge
from merge.publish import publish, tokenizer_source
from merge.recipe import check_recipe
from merge.shards import ShardPlan, parse_size, plan_output_shards
from merge.stream import run_worker
from merge.workers import default_workers, distributed_rank, run_local_workers, wait_for_shards


class Merge:
    """One merge as every worker plans it: the checked recipe, the plan, the output shards (cut
    smaller when there are more workers than shards), the partial directory and the fingerprint."""

    def __init__(self, raw_config: dict, out_dir: str, options: MergeOptions, world: int = 1):
        self.started = time.time()  # planning included in the merge's time
        self.options = options
        self.spec = check_recipe(raw_config)
        self.readers: Dict[str, ModelReader] = {}
        self.plan: MergePlan = plan_merge(self.spec, self.reader)
        self.shard_size = parse_size(options.shard_size)
        self.shards: List[ShardPlan] = plan_output_shards(self.plan.tensors, self.shard_size)
        if len(self.shards) < world <= len(self.plan.tensors):
            # workers own whole shards: cut smaller shards so that every worker gets one
            total = sum(t.nbytes for t in self.plan.tensors)
            step = max(1, max(t.nbytes for t in self.plan.tensors) // 16)
            self.shard_size = -(-total // world)
            self.shards = plan_output_shards(self.plan.tensors, self.shard_size)
            while len(self.shards) > world:  # greedy packing left a remainder: grow a little
                self.shard_size += step
                self.shards = plan_output_shards(self.plan.tensors, self.shard_size)
        self.out = Path(out_dir).expanduser().resolve()
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        self.tokenizer_from = tokenizer_source(self)
        self.fingerprint = self._fingerprint()

    def reader(self, path: str) -> ModelReader:
        if path not in self.readers:
            self.readers[path] = ModelReader(path)
        return self.readers[path]

    def _fingerprint(self) -> str:
        """Changes whenever the output bytes could: config, plan, layout, input files."""
        inputs = sorted(
            (str(f), f.stat().st_size, f.stat().st_mtime_ns) for r in self.readers.values() for f in r.files()
        )
        layout = [
            (s.filename, [(t.name, t.shape, t.work_dtype, t.out_dtype, t.sources, t.params, t.has_base)
                          for t in s.tensors])
            for s in self.shards
        ]
        seed = self.options.random_seed if methods.get(self.spec.merge_method).randomised else None
        blob = json.dumps([self.spec.raw, layout, inputs, seed], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def owned_shards(self, rank: int, world: int) -> List[ShardPlan]:
        """Largest shards first, each to the least-loaded worker: the same on every worker."""
        load = [0] * world
        owner = {}
        for s in sorted(self.shards, key=lambda s: (-s.size, s.filename)):
            w = min(range(world), key=lambda i: (load[i], i))
            owner[s.filename] = w
            load[w] += s.size
        return [s for s in self.shards if owner[s.filename] == rank]

    def is_complete(self, shard: ShardPlan) -> bool:
        marker = self.tmp / f"{shard.filename}.done"
        path = self.tmp / shard.filename
        try:
            return marker.read_text() == self.fingerprint and path.stat().st_size == shard.size
        except OSError:
            return False

    def already_published(self) -> bool:
        index = self.out / "model.safetensors.index.json"
        if not self.out.exists():
            return False
        if index.is_file():
            try:
                if json.loads(index.read_text())["metadata"].get("merge_fingerprint") == self.fingerprint:
                    return True
            except (ValueError, KeyError):
                pass
        if any(self.out.iterdir()):
            raise UserError(
                f"output directory {self.out} already exists and is not this merge's output: "
                "choose a new OUT_DIR or delete it"
            )
        return False


class Progress:
    """tqdm bar: tensors done and output MB/s."""

    def __init__(self, total: int, done: int, enabled: bool, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="tensor", desc=desc, disable=not enabled,
                        mininterval=0.5, file=sys.stderr, dynamic_ncols=True)
        self.bytes = 0
        self.start = time.monotonic()

    def __call__(self, tensors: int, nbytes: int) -> None:
        self.bytes += nbytes
        rate = self.bytes / 1e6 / max(1e-6, time.monotonic() - self.start)
        self.bar.set_postfix_str(f"{rate:,.0f} MB/s", refresh=False)
        self.bar.update(tensors)

    def close(self) -> None:
        self.bar.close()


def log(message: str) -> None:
    print(f"merge: {message}", file=sys.stderr, flush=True)


def run_merge(raw_config: dict, out_dir: str, options: MergeOptions) -> Path:
    """Merge as configured into out_dir; returns out_dir. UserError on bad input."""
    check_value("OUT_DIR", out_dir, (writable_dir,))
    dist = distributed_rank(options)
    rank, world = dist if dist else (0, options.workers or default_workers())
    merge = Merge(raw_config, out_dir, options, world)
    for w in merge.plan.warnings:
        if rank == 0:
            print(f"warning: {w}", file=sys.stderr, flush=True)
    # One merge per output: worker 0 holds the lock (forked local workers share it); the other
    # independent workers only write shards into the partial directory worker 0 publishes.
    with OutputLock(merge.out, "output_dir") if rank == 0 else contextlib.nullcontext():
        return merge_into(merge, rank, world, dist)


def merge_into(merge: Merge, rank: int, world: int, dist: Optional[tuple]) -> Path:
    options = merge.options
    if merge.already_published():
        if rank == 0:
            log(f"{merge.out} already holds this merge; nothing to do")
        return merge.out
    merge.tmp.mkdir(parents=True, exist_ok=True)
    complete = {s.filename for s in merge.shards if merge.is_complete(s)}
    scope = merge.owned_shards(rank, world) if dist else merge.shards
    total = sum(len(s.tensors) for s in scope)
    done = sum(len(s.tensors) for s in scope if s.filename in complete)
    if rank == 0:
        log(f"{len(merge.plan.tensors)} tensors, {sum(t.nbytes for t in merge.plan.tensors) / 1e9:.2f} GB in "
            f"{len(merge.shards)} shard(s) ({len(complete)} already complete), {world} worker(s) -> {merge.out}")
    progress = Progress(total, done, options.progress, f"merge {rank}/{world}" if dist else "merge")
    try:
        if dist or world == 1:
            run_worker(merge, rank, world, progress)
        else:
            run_local_workers(merge, world, progress)
    finally:
        progress.close()
    if rank != 0:
        return merge.out
    if dist:
        wait_for_shards(merge, options.wait_timeout)
    publish(merge)
    log(f"done: {merge.out}")
    log_wandb_run("merge", merge.spec.raw, {
        "merge/seconds": round(time.time() - merge.started, 3),
        "merge/output_bytes": sum(s.size for s in merge.shards),
        "merge/tensors": len(merge.plan.tensors),
        "merge/shards": len(merge.shards),
        "merge/workers": world,
    })
    return merge.out
