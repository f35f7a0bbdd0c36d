"""One augmentation job: read data.cpt's documents (train/data/'s loaders, as a CPT stage reads
them), run the method, publish the dataset and its manifest.

Publishing: the dataset (`datasets.save_to_disk`, column `text`) and manifest.json are written in
a hidden sibling `.<name>.tmp-<pid>` and renamed onto output_dir in one step, manifest.json last:
a directory with manifest.json is a finished output; nothing half-written ever sits at output_dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional

from omegaconf import OmegaConf

from core.errors import UserError
from core.lock import OutputLock
from core.outputs import AUGMENT_MANIFEST as MANIFEST
from core.outputs import fsync_dir, is_augmented_dataset as is_augmented, read_augment_manifest
from train.augment import generation
from train.augment import rewrite as rewriting
from train.augment.methods import augment_method


# ---------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------
def read_documents(cfg) -> List[str]:
    """data.cpt's non-blank `text` values, in order: one path or a mix of sources, any format a CPT
    stage reads (a stream is read whole: augmentation needs every document)."""
    from train.data.mix import canonical_text, load_mix
    from train.data.sources import load_rows

    spec = cfg.data.cpt
    if bool(spec.path) == bool(spec.sources):
        raise UserError("data.cpt: set exactly one of data.cpt.path (one source) or data.cpt.sources (a mix): "
                        "augmentation reads data.cpt")
    if spec.path:
        rows = load_rows(spec, "cpt", streaming=False)
        where = f"data.cpt.path={spec.path}"
    else:
        rows = load_mix(spec, "cpt", canonical_text, cfg.seed, cfg.data.num_proc)
        where = "data.cpt.sources"
    texts = [t for t in rows["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserError(f"{where} holds only empty `text`: point it at a corpus with text")
    return texts


def source_record(cfg, documents: List[str]) -> dict:
    digest = hashlib.sha256()
    for text in documents:
        digest.update(text.encode())
        digest.update(b"\0")
    spec = cfg.data.cpt
    where = spec.path or [s.path for s in spec.sources]
    return {"data.cpt": where, "sha256": digest.hexdigest(), "rows": len(documents)}


def token_counter(cfg):
    """Counts tokens with `model`'s tokenizer (the tokenizer CPT will train with)."""
    from transformers import AutoTokenizer

    from train.model import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model) if cfg.model.path is not None else None
    source = cfg.model.tokenizer_path or model_dir
    if source is None:
        raise UserError(f"model '{cfg.model.name}': set model.tokenizer_path or model.path (tokens are counted with it)")
    tokenizer = AutoTokenizer.from_pretrained(source)

    def count(texts: List[str]) -> int:
        total = 0
        for start in range(0, len(texts), 256):
            total += sum(len(ids) for ids in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"])
        return total

    return count, tokenizer, model_dir


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def check_output_dir(out: Path, settings: dict) -> bool:
    """True when output_dir already holds this very augmentation (a rerun: nothing to do)."""
    if not out.exists():
        return False
    if is_augmented(out):
        if read_augment_manifest(out).get("settings") == settings:
            return True
        raise UserError(f"output_dir={out} holds an augmented dataset made with other settings or data: delete it "
                        "or choose another output_dir")
    if any(out.iterdir()):
        raise UserError(f"output_dir={out} is a non-empty directory that is not an augmented dataset: choose a new "
                        "or empty output_dir")
    return False


def publish(out: Path, texts: List[str], manifest: dict) -> None:
    """Dataset and manifest into a hidden sibling, then one rename onto `out`."""
    import datasets

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    if out.exists():
        out.rmdir()  # empty (check_output_dir); a rename cannot replace a directory otherwise
    os.replace(tmp, out)
    fsync_dir(out.parent)


def settings_of(cfg) -> dict:
    """What decides the output: the method's settings, the seed and the model that counts and rewrites."""
    augment = OmegaConf.to_container(cfg.augment, resolve=True)
    method = augment["method"]
    # a model method generates with rewrite's settings
    used = [method, "rewrite"] if augment_method(method).uses_model else [method]
    return {"method": method, **{name: augment[name] for name in used}, "seed": cfg.seed,
            "model": OmegaConf.to_container(cfg.model, resolve=True)}


def run_rewrite(cfg, documents: List[str], out: Path, settings: dict, source: dict, model_dir: Optional[Path],
                tokenizer, publish_texts: Callable[[List[str], dict], None]) -> bool:
    """Rewrite this rank's shards; the rank that finds every shard done publishes (under the work
    directory's lock, so that two ranks finishing together publish once). True if this rank published."""
    rewrite, method = cfg.augment.rewrite, cfg.augment.method
    generation.check_backend(rewrite.backend)
    if model_dir is None:
        raise UserError(f"augment.method={method} generates with a trained model, and model '{cfg.model.name}' has "
                        "random weights: set model.path=<model dir> or model=smollm2_135m")
    _, world = rewriting.job_rank()
    shards = rewrite.shards or world
    work = rewriting.work_dir(out, rewriting.run_key(source["sha256"], settings, str(model_dir)))

    def render(user: str) -> str:
        return generation.render_prompt(tokenizer, user, rewrite.system_prompt)

    def make_generate():
        return generation.make_generator(rewrite.backend, model_dir, tokenizer, rewrite, cfg.seed)

    task = augment_method(method).task(cfg)
    all_done, resumed = rewriting.run_shards(documents, work, shards, task, rewrite.batch_size, make_generate, render)
    if not all_done:
        print(f"augment: this rank's shards are done in {work}; the rank that finishes the last shard assembles "
              f"{out}", flush=True)
        return False
    with rewriting.AssemblyLock(work) as locked:
        if is_augmented(out):
            return False  # another rank assembled it
        if locked is None:
            raise UserError(f"{work} was removed before this rank could assemble {out} from it: run the same "
                            "command again (it rewrites the shards)")
        rows = rewriting.read_shards(work, shards, len(documents))
        by_doc: Dict[int, List[dict]] = {}
        for row in rows:
            by_doc.setdefault(row["doc"], []).append(row)
        texts = []
        for index, source_text in enumerate(documents):
            if rewrite.keep_source:
                texts.append(source_text)
            texts += [r["text"] for r in by_doc.get(index, []) if r["kept"]]
        kept = sum(r["kept"] for r in rows)
        extra = {
            "rewrites": {"generated": len(rows), "kept": kept, "generated_tokens": sum(r["tokens"] for r in rows),
                         # cut off by the budget, not ended by the model: raise max_new_tokens if many are
                         "hit_max_new_tokens": sum(r["tokens"] >= rewrite.max_new_tokens for r in rows),
                         **({"per_style": {s: sum(r["kept"] for r in rows if r["label"] == s) for s in rewrite.styles}}
                            if method == "rewrite" else {})},
            "rejected": dict(Counter(r["reason"] for r in rows if not r["kept"])),
            "shards": len(rewriting.shard_bounds(len(documents), shards)),
            "resumed_shards": resumed,
        }
        if not texts:
            raise UserError(f"the fact filter dropped all {len(rows)} rewrites ({extra['rejected']}) and "
                            "augment.rewrite.keep_source=false: nothing to publish; use a stronger model, or keep "
                            f"the sources; the rewrites are in {work}")
        publish_texts(texts, extra)
    shutil.rmtree(work, ignore_errors=True)
    return True


def run_augment(cfg) -> Optional[Path]:
    """Augment data.cpt into cfg.output_dir; the output path, or None when another rank publishes it."""
    out = Path(cfg.output_dir).expanduser().absolute()
    settings = settings_of(cfg)
    method, chosen = cfg.augment.method, augment_method(cfg.augment.method)
    rank, world = rewriting.job_rank()
    if not chosen.uses_model and rank != 0:
        print(f"augment {method}: runs on rank 0 only (rank {rank} of {world} has nothing to do)", flush=True)
        return None
    chosen.preflight(cfg.augment)
    documents = read_documents(cfg)
    source = source_record(cfg, documents)
    settings["source_sha256"] = source["sha256"]
    if check_output_dir(out, settings):
        print(f"augment: {out} already holds this augmentation, nothing to do", flush=True)
        return out
    count, tokenizer, model_dir = token_counter(cfg)
    started = time.perf_counter()

    def publish_texts(texts: List[str], extra: dict) -> None:
        manifest = {
            "method": method,
            "settings": settings,
            "source": source,
            "rows_in": len(documents),
            "tokens_in": count(documents),
            "rows_out": len(texts),
            "tokens_out": count(texts),
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "seconds": round(time.perf_counter() - started, 1),  # this rank's, for a sharded rewrite
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rejected": {},
            **extra,
        }
        publish(out, texts, manifest)
        rejected = ", ".join(f"{k} {v}" for k, v in manifest["rejected"].items()) or "none"
        print(f"augment {method}: {manifest['rows_in']} documents ({manifest['tokens_in']} tokens) -> "
              f"{manifest['rows_out']} ({manifest['tokens_out']} tokens), rejected: {rejected}; {out} "
              f"(data.cpt.path={out})", flush=True)

    if chosen.uses_model:
        return out if run_rewrite(cfg, documents, out, settings, source, model_dir, tokenizer, publish_texts) else None
    with OutputLock(out, "output_dir"):
        texts = chosen.texts(cfg, documents, count)
        publish_texts(texts, {})
    return out
