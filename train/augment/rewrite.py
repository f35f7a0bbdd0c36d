"""Model-based rewriting (WRAP: Maini et al. 2024, arXiv 2401.16380): a local causal LM rewrites
every document once per style; a fact-preservation filter (text.lost_fact) drops each rewrite that
loses or changes a number, a unit or a named entity of its source.

Sharded and resumable: the documents are cut into `shards` contiguous shards; rank k of n (RANK/
WORLD_SIZE, or SLURM_PROCID/SLURM_NTASKS) takes shards k, k+n, ... Each finished shard is written
atomically into a hidden work directory beside the output, then marked done; a rerun keeps the
done shards. The rank that finishes the last shard assembles the dataset (run.publish).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from core.outputs import write_atomic
from train.augment.generation import Generate
from train.augment.text import copies_source, lost_fact

# Test hook: SIGKILL this process once it has finished shards holding this many documents (the
# kill-and-resume test; a real kill lands anywhere, and a half-done shard is simply redone).
STOP_AFTER_ENV = "DOMAINFORGE_AUGMENT_STOP_AFTER"
DOCUMENT_SLOT = "{document}"
"""Where a prompt template takes the document."""


def job_rank() -> Tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's variables, else SLURM's, else (0, 1)."""
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[world_key])
    return 0, 1


def shard_bounds(n_documents: int, shards: int) -> List[Tuple[int, int]]:
    """[start, end) of each of `shards` contiguous, near-equal shards (none empty)."""
    shards = max(1, min(shards, n_documents))
    base, extra = divmod(n_documents, shards)
    bounds, start = [], 0
    for k in range(shards):
        end = start + base + (k < extra)
        bounds.append((start, end))
        start = end
    return bounds


# ---------------------------------------------------------------------------------------------
# one shard
# ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """tqdm bar over this rank's documents, with generated tokens/s beside documents/s."""

    total: int
    desc: str

    def __post_init__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="doc", dynamic_ncols=True)
        self.tokens, self.start = 0, time.perf_counter()

    def update(self, documents: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:.1f} gen tok/s", refresh=False)
        self.bar.update(documents)

    def close(self) -> None:
        self.bar.close()


@dataclass
class ModelTask:
    """What the model is asked for each document, and how its answer is judged."""

    prompts: Callable[[int, str], List[Tuple[str, str]]]
    """(document index, document) -> [(label, user prompt)]: one generation each."""
    check: Callable[[str, str, str], Optional[Tuple[str, str]]]
    """(source, generated text, label) -> (reason, fact) when the text may not be kept, else None."""


def keep_nonempty(source: str, text: str, label: str = "") -> Optional[Tuple[str, str]]:
    return None if text.strip() else ("empty", "")


def wrap_task(rewrite) -> ModelTask:
    """WRAP: each document once per style, every fact of the source kept (text.lost_fact), and
    not the source itself again (text.copies_source)."""
    def prompts(index: int, document: str) -> List[Tuple[str, str]]:
        return [(style, rewrite.prompts[style].replace(DOCUMENT_SLOT, document)) for style in rewrite.styles]

    def check(source: str, text: str, label: str) -> Optional[Tuple[str, str]]:
        return ("copied", "") if copies_source(source, text) else lost_fact(source, text)

    return ModelTask(prompts, check if rewrite.filter else keep_nonempty)


def rewrite_documents(documents: Sequence[Tuple[int, str]], task: ModelTask, batch_size: int, generate: Generate,
                      render: Callable[[str], str], progress: Optional[Progress] = None) -> List[dict]:
    """Rows {doc, label, text, tokens, kept, reason, fact} for every prompt of every document:
    batches of batch_size prompts, longest first (less padding), then back in document order."""
    jobs = []  # (document index, label, rendered prompt, source, share of its document)
    for index, text in documents:
        asked = task.prompts(index, text)
        jobs += [(index, label, render(prompt), text, 1 / len(asked)) for label, prompt in asked]
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][2]))
    rows: Dict[int, dict] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        results = generate([jobs[j][2] for j in chunk])
        for j, (text, tokens) in zip(chunk, results):
            index, label, _, source, _ = jobs[j]
            problem = task.check(source, text, label)
            rows[j] = dict(doc=index, label=label, text=text, tokens=tokens, kept=problem is None,
                           reason=problem[0] if problem else None, fact=problem[1] if problem else None)
        if progress is not None:
            progress.update(sum(jobs[j][4] for j in chunk), sum(t for _, t in results))
    if progress is not None:  # documents that asked nothing
        progress.update(sum(1 for index, text in documents if not any(j[0] == index for j in jobs)), 0)
    return [rows[j] for j in range(len(jobs))]


# ---------------------------------------------------------------------------------------------
# the sharded run
# ---------------------------------------------------------------------------------------------
def work_dir(output_dir: Path, key: str) -> Path:
    """Hidden sibling holding the finished shards of one run (key: source and settings)."""
    return output_dir.parent / f".{output_dir.name}.shards-{key[:16]}"


def run_key(source_sha256: str, settings: dict, model_id: str) -> str:
    blob = json.dumps({"source": source_sha256, "settings": settings, "model": model_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_file(work: Path, k: int, n: int) -> Path:
    return work / f"shard-{k:05d}-of-{n:05d}.jsonl"


def done_marker(work: Path, k: int, n: int) -> Path:
    return work / f"shard-{k:05d}-of-{n:05d}.done"


def run_shards(documents: List[str], work: Path, shards: int, task: ModelTask, batch_size: int,
               make_generate: Callable[[], Generate], render: Callable[[str], str]) -> Tuple[bool, int]:
    """Rewrite this rank's unfinished shards into `work`; (every shard is done, how many of this
    rank's shards an earlier run had finished)."""
    bounds = shard_bounds(len(documents), shards)
    n = len(bounds)
    rank, world = job_rank()
    mine = [k for k in range(rank, n, world)]
    todo = [k for k in mine if not done_marker(work, k, n).is_file()]
    kept = len(mine) - len(todo)
    if kept:
        print(f"augment: rank {rank}: {kept} of my {len(mine)} shards are already done in {work}, keeping them",
              flush=True)
    if todo:
        work.mkdir(parents=True, exist_ok=True)
        generate = make_generate()
        stop_after = int(os.environ.get(STOP_AFTER_ENV, "0"))
        total = sum(bounds[k][1] - bounds[k][0] for k in todo)
        progress = Progress(total, f"rewrite rank {rank}/{world}")
        finished = 0
        try:
            for k in todo:
                start, end = bounds[k]
                rows = rewrite_documents(list(enumerate(documents[start:end], start)), task, batch_size, generate,
                                         render, progress)
                write_atomic(shard_file(work, k, n), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                counts = Counter(r["reason"] for r in rows if not r["kept"])
                write_atomic(done_marker(work, k, n), json.dumps({"documents": end - start, "rows": len(rows),
                                                                  "rejected": dict(counts)}) + "\n")
                finished += end - start
                if stop_after and finished >= stop_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            progress.close()
    return all(done_marker(work, k, n).is_file() for k in range(n)), kept


def read_shards(work: Path, shards: int, n_documents: int) -> List[dict]:
    n = len(shard_bounds(n_documents, shards))
    rows = []
    for k in range(n):
        with open(shard_file(work, k, n)) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


class AssemblyLock:
    """Blocking flock on the work directory: one rank assembles, a later one finds the output."""

    def __init__(self, work: Path):
        self.path = work / ".assemble.lock"

    def __enter__(self) -> Optional["AssemblyLock"]:
        """self, holding the lock; None when the work directory is gone (the assembling rank
        removes it once the output is published)."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            self.fd = None
            return None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
