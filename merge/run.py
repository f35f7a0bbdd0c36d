"""Run a merge: plan, split the output shards across workers, stream, verify, publish.

Crash safety: everything is written into a hidden sibling `.<OUT_DIR>.partial/`. A shard
counts as complete only when `<shard>.done` holds this merge's fingerprint, written after the
shard was fsynced and its header re-read; a rerun keeps complete shards. Worker 0 writes the
index, config, tokenizer and card once every shard is complete, then renames the directory
into place, so OUT_DIR either does not exist or holds a finished model.

Workers: `workers=W` forks W processes on this machine; under SLURM (SLURM_NTASKS > 1) or
with `num_workers`/`worker_rank`, this process is one of W independent workers that share
only the filesystem (no rendezvous): each owns whole shards, worker 0 waits for the others'
markers and publishes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import yaml

from core.errors import UserError, disk_full_error
from core.lock import OutputLock
from core.model_card import CARD_FILE, LINEAGE_FILE, installed_versions, lineage_record, write_model_card
from core.outputs import fsync_dir, write_atomic
from core.safetensors_header import read_header
from core.secrets import redact
from core.validate import check_value, writable_dir
from core.wandb_runs import log_wandb_run
from merge.config import MergeOptions
from merge.io import (
    ITEMSIZE,
    TORCH_NAMES,
    ModelReader,
    ShardWriter,
    decode,
    encode,
    pread_exact,
    round_through,
)
from merge.plan import MergePlan, TensorPlan, plan_merge
from merge.recipe import check_recipe
from merge.shards import ShardPlan, parse_size, plan_output_shards
from merge import methods
from merge.methods.numeric import Rounder, TensorContext

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# Test hook: seconds to sleep after each completed shard, so a test can kill a merge mid-way.
PAUSE_ENV = "DOMAINFORGE_MERGE_PAUSE_AFTER_SHARD"


def default_workers() -> int:
    """One worker per CPU this process may use, at most 4 (~70 MB RSS each)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def distributed_rank(options: MergeOptions) -> Optional[tuple]:
    """(rank, world) when this process is one of several independent workers, else None."""
    if options.num_workers is not None or options.worker_rank is not None:
        if options.num_workers is None or options.worker_rank is None:
            raise UserError("give both --num-workers W and --worker-rank R (0 <= R < W)")
        world, rank = options.num_workers, options.worker_rank
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        world, rank = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_PROCID"])
    else:
        return None
    if not 0 <= rank < world:
        raise UserError(f"worker rank {rank} is outside [0, {world}): give --worker-rank between 0 and W-1")
    return rank, world


# ---------------------------------------------------------------------------------------------
# planning shared by every worker
# ---------------------------------------------------------------------------------------------
class Merge:
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


def embedding_rows(reader: ModelReader) -> Optional[int]:
    """Rows of the model's input embedding (its vocabulary size); None if it has none."""
    return next((info.shape[0] for name, (_, info) in reader.tensors.items() if "embed" in name), None)


def tokenizer_ids(model: Path, rows: Optional[int]) -> Optional[int]:
    """How many token ids the model's tokenizer can emit: 1 + the highest id of tokenizer.json's
    vocabulary and added tokens; without a tokenizer.json, its embedding rows (the tokenizer
    fits its own model)."""
    try:
        data = json.loads((model / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return rows
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]  # Unigram: [[piece, score], ...]
    ids += [t["id"] for t in data.get("added_tokens") or []]
    return max(ids) + 1 if ids else rows


def tokenizer_source(merge: Merge) -> Path:
    """The model whose tokenizer, chat template and generation config the output gets: base_model,
    unless `embed_mismatch: truncate` kept fewer vocabulary rows than its tokenizer has ids (the
    merged model would emit ids past its embedding); then the first input whose tokenizer fits
    the kept rows. Explicit `tokenizer_source: base` with such a base is refused."""
    base, rows = Path(merge.plan.base_model).expanduser(), merge.plan.vocab_rows
    base_ids = tokenizer_ids(base, embedding_rows(merge.reader(merge.plan.base_model))) if rows is not None else None
    if base_ids is None or base_ids <= rows:
        return base
    fix = f"make the model with {rows} vocabulary rows base_model"
    if merge.spec.raw.get("tokenizer_source") is None:
        models = dict.fromkeys(src.model for s in merge.spec.slices for src in s.sources)
        for model in models:
            path = Path(model).expanduser()
            ids = tokenizer_ids(path, embedding_rows(merge.reader(model)))
            if path != base and ids is not None and ids <= rows and any((path / f).is_file() for f in TOKENIZER_FILES):
                merge.plan.warnings.append(
                    f"embed_mismatch: truncate keeps {rows} vocabulary rows but base_model's tokenizer has {base_ids} "
                    f"ids: the tokenizer, chat template and generation config come from {model} instead")
                return path
        fix = f"{fix}, or merge models that share one tokenizer"
    else:
        fix = f"{fix}, or remove tokenizer_source: base to take the tokenizer of a model that fits"
    raise UserError(
        f"embed_mismatch: truncate keeps {rows} vocabulary rows, but the tokenizer of base_model {base} has {base_ids} "
        f"ids: the merged model could emit ids past its vocabulary; {fix}"
    )


# ---------------------------------------------------------------------------------------------
# the streaming kernel
# ---------------------------------------------------------------------------------------------
class Buffers:
    """Reused per-worker scratch: memory stays flat whatever the tensor or model size.

    Two levels: an I/O chunk (`chunk` elements of each input, mapped from the page cache) and
    compute blocks (`BLOCK` elements) that stay in CPU cache while they are decoded, reduced,
    interpolated, encoded and written.
    """

    BLOCK = 256 * 1024

    def __init__(self, chunk: int, inputs: int):
        self.chunk = chunk
        self.inputs = inputs
        block = min(self.BLOCK, chunk)
        self.out = np.empty(block * 8, np.uint8)
        self.block = block
        self.tmp = np.empty(block * 8, np.uint8)
        self.scratch = np.empty(block, np.uint32)
        self.finite = np.empty(block, np.bool_)
        self._compute: Dict[type, List[np.ndarray]] = {}

    def compute(self, dtype) -> List[np.ndarray]:
        if dtype not in self._compute:
            self._compute[dtype] = [np.empty(self.block, dtype) for _ in range(self.inputs)]
        return self._compute[dtype]


def _read(plan: TensorPlan, merge: Merge, start: int, count: int) -> List[tuple]:
    """Raw bytes of elements [start, start+count) of every source: [(uint8 array, dtype)]."""
    raws = []
    for model, name in plan.sources:
        reader = merge.reader(model)
        raws.append((reader.map_elements(name, start, count), reader.info(name).dtype))
    return raws


def _decode(plan: TensorPlan, buf: Buffers, raws, lo: int, hi: int, compute) -> List[np.ndarray]:
    """Elements [lo, hi) of a chunk as `compute` arrays, rounded to the plan's working dtype
    (mergekit loads the inputs as `dtype`, then computes in float32)."""
    arrays = []
    for j, (raw, dtype) in enumerate(raws):
        size = ITEMSIZE[dtype]
        x = decode(raw[lo * size : hi * size], dtype, buf.compute(compute)[j][: hi - lo])
        if plan.work_dtype in ("BF16", "F16") and dtype != plan.work_dtype:
            round_through(x, plan.work_dtype, buf.tmp, buf.scratch)
        arrays.append(x)
    return arrays


def read_elements(plan: TensorPlan, merge: Merge, rnd: Rounder, compute, start: int, count: int) -> List[np.ndarray]:
    """Elements [start, start+count) of every source as fresh arrays rounded to the working
    dtype: for methods that look at whole rows around a block (della)."""
    arrays = []
    for raw, dtype in _read(plan, merge, start, count):
        x = decode(raw, dtype, np.empty(count, compute))
        if plan.work_dtype in ("BF16", "F16") and dtype != plan.work_dtype:
            rnd(x)
        arrays.append(x)
    return arrays


def merge_tensor(plan: TensorPlan, merge: Merge, buf: Buffers, writer: ShardWriter, offset: int) -> None:
    """Stream one output tensor to byte `offset` of the open shard.

    The method's job (merge/methods/) makes `job.passes` reduction passes over every chunk
    (SLERP's norms and dot, TIES's k-th magnitude, ...), then the writing pass combines each
    block. A tensor that fits one chunk is mapped once for all passes."""
    compute = np.float64 if plan.work_dtype == "F64" else np.float32
    n, chunk, block = plan.numel, buf.chunk, buf.block
    rnd = Rounder(plan.work_dtype)
    ctx = TensorContext(compute, rnd, lambda start, count: read_elements(plan, merge, rnd, compute, start, count),
                        block, merge.options.random_seed)
    job = methods.get(plan.method).job(plan, ctx)
    held = None  # the raw chunk kept between the passes when the tensor is one chunk
    for pass_index in range(job.passes):
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            raws = held if held is not None else _read(plan, merge, start, count)
            for lo in range(0, count, block):
                job.reduce(pass_index, _decode(plan, buf, raws, lo, min(lo + block, count), compute), start + lo)
            held = raws if count == n else None
        job.end_pass(pass_index)
    out_size = ITEMSIZE[plan.out_dtype]
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        raws = held if held is not None else _read(plan, merge, start, count)
        for lo in range(0, count, block):
            hi = min(lo + block, count)
            result = job.combine(_decode(plan, buf, raws, lo, hi, compute), start + lo)
            if not job.proven_finite and not np.isfinite(result, out=buf.finite[: hi - lo]).all():
                raise UserError(
                    f"merged tensor '{plan.name}' has inf/nan values (from {plan.sources[0][0]} and "
                    f"{plan.sources[-1][0]}): check the input models for non-finite weights"
                )
            if plan.out_dtype != plan.work_dtype and plan.work_dtype in ("BF16", "F16"):
                round_through(result, plan.work_dtype, buf.tmp, buf.scratch)  # mergekit stores `dtype` first
            # write each block while it is still in cache (one 16 MB write per chunk ran ~2x slower)
            writer.write(encode(result, plan.out_dtype, buf.out, buf.scratch), offset + (start + lo) * out_size)


def check_shard_header(path: Path, shard: ShardPlan) -> None:
    header = read_header(path)
    for t in shard.tensors:
        info = header.tensors.get(t.name)
        if info is None or info.shape != tuple(t.shape) or info.dtype != t.out_dtype:
            raise UserError(f"{path}: tensor '{t.name}' missing or wrong after writing; rerun the merge")


def write_shard(merge: Merge, shard: ShardPlan, buf: Buffers, report: Callable[[int, int], None]) -> None:
    path = merge.tmp / shard.filename
    marker = merge.tmp / f"{shard.filename}.done"
    marker.unlink(missing_ok=True)
    writer = ShardWriter(path, shard.head, shard.size)
    try:
        for t, offset in zip(shard.tensors, shard.offsets):
            merge_tensor(t, merge, buf, writer, offset)
            report(1, t.nbytes)
    except BaseException:
        writer.close(sync=False)
        raise
    writer.close()
    check_shard_header(path, shard)
    write_atomic(marker, merge.fingerprint)


def run_worker(merge: Merge, rank: int, world: int, report: Callable[[int, int], None]) -> None:
    todo = [s for s in merge.owned_shards(rank, world) if not merge.is_complete(s)]
    if not todo:
        return
    buf = Buffers(merge.options.chunk_elements, max(len(t.sources) for s in todo for t in s.tensors))
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    for shard in todo:
        write_shard(merge, shard, buf, report)
        if pause:
            time.sleep(pause)


# ---------------------------------------------------------------------------------------------
# publishing
# ---------------------------------------------------------------------------------------------
def wait_for_shards(merge: Merge, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = [s.filename for s in merge.shards if not merge.is_complete(s)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise UserError(
                f"timed out after {timeout:.0f}s waiting for {len(missing)} shard(s) ({missing[0]}, ...) from the "
                "other workers: check their logs, then rerun the same command (complete shards are kept)"
            )
        time.sleep(1.0)


def verify_output(directory: Path, merge: Merge) -> None:
    """Every planned tensor present in the index and its shard, right shape/dtype, finite."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    buf = Buffers(merge.options.chunk_elements, 1)
    raw_buf = np.empty(buf.chunk * 8, np.uint8)
    for shard in merge.shards:
        path = directory / shard.filename
        header = read_header(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for t in shard.tensors:
                info = header.tensors.get(t.name)
                if index.get(t.name) != shard.filename or info is None:
                    raise UserError(f"verify: tensor '{t.name}' is missing from {path.name}: rerun the merge")
                if info.shape != tuple(t.shape) or info.dtype != t.out_dtype:
                    raise UserError(
                        f"verify: '{t.name}' is {list(info.shape)} {info.dtype}, expected {list(t.shape)} "
                        f"{t.out_dtype}: rerun the merge"
                    )
                compute = np.float64 if info.dtype == "F64" else np.float32
                size = ITEMSIZE[info.dtype]
                for start in range(0, t.numel, buf.chunk):
                    count = min(buf.chunk, t.numel - start)
                    raw = raw_buf[: count * size]
                    pread_exact(fd, raw, info.begin + start * size, path)
                    for lo in range(0, count, buf.block):
                        hi = min(lo + buf.block, count)
                        x = decode(raw[lo * size : hi * size], info.dtype, buf.compute(compute)[0][: hi - lo])
                        if not np.isfinite(x, out=buf.finite[: hi - lo]).all():
                            raise UserError(f"verify: '{t.name}' in {path.name} has inf/nan values: rerun the merge")
        finally:
            os.close(fd)


def merge_lineage(merge: Merge) -> dict:
    """This merge's lineage record for its model card (core/model_card.py): the recipe, and each
    input model's own lineage when it is a domainforge output."""
    spec = merge.spec
    models = sorted({src.model for s in spec.slices for src in s.sources})
    method = methods.get(spec.merge_method)
    role = "t=0 returns it" if spec.merge_method == "slerp" else "the task vectors start from it"
    seed = f" Random draws: `random_seed` {merge.options.random_seed}." if method.randomised else ""
    description = [
        f"This model is a **{spec.merge_method.upper()}** merge of "
        + ", ".join(f"`{m}`" for m in models)
        + (f", with `{spec.base_model}` as the base ({role})." if spec.base_model else "."),
        "It was made with domainforge's streaming merger (`python launch/merge.py`), whose methods and",
        "per-layer parameters follow mergekit 0.1.5; the tokenizer, chat template and generation config come",
        f"from `{merge.tokenizer_from}`. {len(merge.plan.tensors)} tensors, "
        f"{sum(t.nbytes for t in merge.plan.tensors) / 1e9:.2f} GB in {len(merge.shards)} shard(s).{seed}",
    ]
    step = {
        "kind": "merge",
        "name": spec.merge_method,
        "output": str(merge.out),
        "method": spec.merge_method,
        "models": models,
        "summary": [f"Note: {w}." for w in merge.plan.warnings],
        "recipe": spec.raw,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": installed_versions(("numpy", "safetensors")),
        "description": description,
    }
    return lineage_record(step, models)


def publish(merge: Merge) -> None:
    """Index, config, tokenizer, card into the temp dir; verify; rename into OUT_DIR."""
    tmp, base = merge.tmp, Path(merge.plan.base_model).expanduser()
    weight_map = {t.name: s.filename for s in merge.shards for t in s.tensors}
    total = sum(t.nbytes for t in merge.plan.tensors)
    index = {"metadata": {"total_size": total, "merge_fingerprint": merge.fingerprint}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = dict(merge.reader(str(base)).config or {})
    if config:
        out_dtype = TORCH_NAMES[merge.plan.tensors[0].out_dtype]
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
        if merge.plan.vocab_rows is not None:
            config["vocab_size"] = merge.plan.vocab_rows
        source = merge.reader(str(merge.tokenizer_from)).config or {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids of the tokenizer the output gets
            if merge.tokenizer_from != base and key in source:
                config[key] = source[key]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (merge.tokenizer_from / name).is_file():
            shutil.copyfile(merge.tokenizer_from / name, tmp / name)
    (tmp / "mergekit_config.yml").write_text(redact(yaml.safe_dump(merge.spec.raw, sort_keys=False)))
    write_model_card(tmp, merge_lineage(merge), title=merge.out.name)  # README.md + lineage.json
    if merge.options.verify:
        verify_output(tmp, merge)
    expected = {s.filename for s in merge.shards} | {
        "model.safetensors.index.json", "config.json", "mergekit_config.yml", CARD_FILE, LINEAGE_FILE, *TOKENIZER_FILES}
    for p in tmp.iterdir():  # markers and leftovers of an earlier, different merge
        if p.name not in expected:
            p.unlink() if p.is_file() else shutil.rmtree(p)
    for p in tmp.iterdir():
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp)
    if merge.out.exists():
        merge.out.rmdir()  # empty (already_published checked)
    os.rename(tmp, merge.out)
    fsync_dir(merge.out.parent)


# ---------------------------------------------------------------------------------------------
# entry
# ---------------------------------------------------------------------------------------------
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


def _child(merge: Merge, rank: int, world: int, queue) -> None:
    try:
        import ctypes
        import signal

        # die with the parent: a killed merge must not leave workers writing behind it
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    try:
        run_worker(merge, rank, world, lambda n, b: queue.put(("progress", n, b)))
        queue.put(("done", rank, 0))
    except (UserError, OSError) as err:
        message = err if isinstance(err, UserError) else disk_full_error(err)
        if message is None:
            raise
        queue.put(("error", str(message), 0))
        queue.close()
        queue.join_thread()  # put() hands the message to a feeder thread: flush it before _exit
        os._exit(2)


def run_local_workers(merge: Merge, world: int, report: Callable[[int, int], None]) -> None:
    import multiprocessing as mp
    import queue as queue_lib

    ctx = mp.get_context("fork")  # the plan and open readers are inherited, nothing re-parsed
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(merge, r, world, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    finished = 0
    try:
        while finished < world:
            try:
                kind, a, b = queue.get(timeout=1.0)
            except queue_lib.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise UserError(
                        f"merge worker exited with code {dead[0].exitcode} (see the message above); "
                        "rerun the same command to resume"
                    )
                continue
            if kind == "progress":
                report(a, b)
            elif kind == "done":
                finished += 1
            else:
                raise UserError(a)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
