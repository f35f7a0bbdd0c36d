"""Publishing a merge: which model the tokenizer comes from (decided when the merge is planned),
then worker 0's last step: the index, config.json, tokenizer files, mergekit_config.yml and the
model card (README.md + lineage.json) into the partial directory, `--verify`'s re-read of
every tensor, and the rename into OUT_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import yaml

from core.errors import UserError
from core.model_card import CARD_FILE, LINEAGE_FILE, installed_versions, lineage_record, write_model_card
from core.outputs import fsync_dir
from core.safetensors_header import read_header
from core.secrets import redact
from merge import methods
from merge.io import ITEMSIZE, TORCH_NAMES, ModelReader, decode, pread_exact
from merge.stream import Buffers

if TYPE_CHECKING:
    from merge.run import Merge

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


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
