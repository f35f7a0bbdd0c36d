"""End-to-end merges of two tiny sharded Llama checkpoints through the real entry point:
the output loads with AutoModelForCausalLM and equals an independent float64 reference merge;
workers, ranks, chunking and the Hydra form give identical bytes; a killed merge leaves no
finished-looking output and resumes to identical bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from tests.support.env import REPO, assert_one_line_error, offline_env
from tests.support.merge import SHARD, assert_bf16_close, paper_t, reference_slerp, run_merge_cli, write_config
from tests.support.models import load_dir, shard_bytes, tiny_llama

pytestmark = pytest.mark.integration


def test_merge_loads_and_matches_reference(paper_merge, tiny_pair):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = paper_merge
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # sharded
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    base, other = load_dir(tiny_pair["base"]), load_dir(tiny_pair["other"])
    merged = {k: v for k, v in model.state_dict().items()}
    assert set(merged) == set(base) == set(index["weight_map"])
    for name, tensor in merged.items():
        assert_bf16_close(tensor, reference_slerp(paper_t(name, 4), base[name], other[name]), name)
    # the gradient really varies: layer 0 attention is the base, layer 3 attention the other model
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.3.self_attn.q_proj.weight"], other["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])
    # tokenizer + chat template from the base, config dtype, resolved config and card beside it
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and (out / "chat_template.jinja").read_text() == (
        tiny_pair["base"] / "chat_template.jinja").read_text()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "slerp"
    card = (out / "README.md").read_text()
    assert "SLERP" in card and str(tiny_pair["base"]) in card
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    assert not (out.parent / ".out.partial").exists()


@pytest.mark.parametrize("t,source", [(0, "base"), (1, "other")])
def test_t_endpoints_return_a_model_exactly(tmp_path, tiny_pair, t, source):
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"], t=t)
    proc = run_merge_cli(cfg, tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    got, want = load_dir(tmp_path / "out"), load_dir(tiny_pair[source])
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].view(-1).view(dtype=__import__("torch").int16).equal(
            want[name].view(-1).view(dtype=__import__("torch").int16)), name


def test_a_chunk_is_unmapped_before_the_next_is_mapped(tmp_path, tiny_pair, paper_merge, monkeypatch):
    """Chunks are mapped with MAP_POPULATE: two resident at once would raise the peak RSS."""
    import weakref

    from merge.config import MergeOptions
    from merge.io import ModelReader
    from merge.recipe import load_merge_config
    from merge.run import run_merge
    from merge.shards import parse_size

    live, overlaps, map_elements = [], [], ModelReader.map_elements

    def tracked(reader, name, start, count):
        chunk = (name, start)
        overlaps.extend(key for key, ref in live if ref() is not None and key != chunk)
        array = map_elements(reader, name, start, count)
        live.append((chunk, weakref.ref(array)))
        return array

    monkeypatch.setattr(ModelReader, "map_elements", tracked)
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"])
    run_merge(load_merge_config(str(cfg)), str(tmp_path / "chunked"),
              MergeOptions(shard_size=parse_size(SHARD), workers=1, chunk_elements=1000, progress=False))
    assert len({key for key, _ in live}) > 10 and not overlaps, overlaps[:5]
    assert shard_bytes(tmp_path / "chunked") == shard_bytes(paper_merge)


def test_workers_ranks_chunks_and_hydra_give_identical_bytes(tmp_path, tiny_pair, paper_merge):
    from merge.config import MergeOptions
    from merge.recipe import load_merge_config
    from merge.run import run_merge
    from merge.shards import parse_size

    want = shard_bytes(paper_merge)
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"])
    # W local worker processes
    proc = run_merge_cli(cfg, tmp_path / "w2", "--shard-size", SHARD, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(tmp_path / "w2") == want
    # fewer shards than workers at the default 2GB: shards are cut so that each worker has one
    proc = run_merge_cli(cfg, tmp_path / "split", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "split").glob("*.safetensors"))) == 2
    assert load_dir(tmp_path / "split").keys() == load_dir(paper_merge).keys()
    # two independent ranks (as under srun): rank 1 finishes its shards and leaves, rank 0 publishes
    for rank in (1, 0):
        proc = run_merge_cli(cfg, tmp_path / "ranks", "--shard-size", SHARD, "--num-workers", "2",
                             "--worker-rank", rank, "--wait-timeout", "60")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "ranks").exists() == (rank == 0)
    assert shard_bytes(tmp_path / "ranks") == want
    # SLURM's variables select the same
    env = offline_env(SLURM_NTASKS="2", SLURM_PROCID="1")
    proc = run_merge_cli(cfg, tmp_path / "slurm", "--shard-size", SHARD, env=env)
    assert proc.returncode == 0 and not (tmp_path / "slurm").exists()
    assert len(list((tmp_path / ".slurm.partial").glob("*.done"))) >= 1
    # chunks of 1000 elements (every big tensor in two passes) equal whole tensors
    run_merge(load_merge_config(str(cfg)), str(tmp_path / "chunked"),
              MergeOptions(shard_size=parse_size(SHARD), workers=1, chunk_elements=1000, progress=False))
    assert shard_bytes(tmp_path / "chunked") == want
    # the Hydra form with the paper preset (models: form) plans the same merge
    proc = run_merge_cli("merge=paper_slerp", f"merge.model={tiny_pair['other']}",
                         f"merge.base_model={tiny_pair['base']}", f"output_dir={tmp_path / 'hydra'}",
                         f"shard_size={SHARD}", "progress=false")
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(tmp_path / "hydra") == want


def test_rank0_times_out_with_one_line_when_other_workers_never_come(tmp_path, tiny_pair):
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"])
    proc = run_merge_cli(cfg, tmp_path / "out", "--shard-size", SHARD, "--num-workers", "3", "--worker-rank", "0",
                         "--wait-timeout", "1", "--quiet")
    assert_one_line_error(proc, "timed out", "rerun")
    assert not (tmp_path / "out").exists()


def test_killed_merge_leaves_no_output_and_resumes_to_identical_bytes(tmp_path, tiny_pair):
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"])
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    env = offline_env(DOMAINFORGE_MERGE_PAUSE_AFTER_SHARD="60")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "merge.py"), str(cfg), str(out),
                             "--shard-size", SHARD, "--workers", "1", "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(partial.glob("*.done")) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(partial.glob("*.done"))
    assert len(done) == 1 and not out.exists()
    first = partial / done[0].name[: -len(".done")]
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    proc = run_merge_cli(cfg, out, "--shard-size", SHARD)
    assert proc.returncode == 0, proc.stderr
    assert "(1 already complete)" in proc.stderr
    kept = out / first.name
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == stamp  # kept, not recomputed
    assert not partial.exists() and not list(out.glob("*.done"))
    # the reference is merged here, not by a fixture: a broken merger then fails this test
    reference = tmp_path / "reference"
    assert run_merge_cli(cfg, reference, "--shard-size", SHARD, "--workers", "1").returncode == 0
    assert shard_bytes(out) == shard_bytes(reference)
    # a finished merge rerun is a no-op; a foreign non-empty OUT_DIR is refused
    proc = run_merge_cli(cfg, out, "--shard-size", SHARD)
    assert proc.returncode == 0 and "nothing to do" in proc.stderr
    other = write_config(tmp_path / "o.yml", tiny_pair["base"], tiny_pair["other"], t=0.2)
    assert_one_line_error(run_merge_cli(other, out, "--shard-size", SHARD), "already exists", str(out))


def test_tied_embeddings_merge_without_lm_head(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    a = tiny_llama(tmp_path / "a", 3, tie=True)
    b = tiny_llama(tmp_path / "b", 4, tie=True)
    assert "lm_head.weight" not in load_dir(a)
    cfg = write_config(tmp_path / "m.yml", a, b, t=0.5)
    proc = run_merge_cli(cfg, tmp_path / "out", "--verify", "--quiet")
    assert proc.returncode == 0, proc.stderr
    merged = load_dir(tmp_path / "out")
    assert "lm_head.weight" not in merged
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    ref = reference_slerp(0.5, load_dir(a)["model.embed_tokens.weight"], load_dir(b)["model.embed_tokens.weight"])
    assert_bf16_close(emb.detach(), ref)


def test_vocab_mismatch_fails_or_truncates(tmp_path, tiny_pair):
    import torch
    from transformers import AutoModelForCausalLM

    bigger = tiny_llama(tmp_path / "bigger", 5, vocab=2056)
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], bigger)
    line = assert_one_line_error(run_merge_cli(cfg, tmp_path / "out"), "vocabulary mismatch", "2048", "2056",
                                 "embed_mismatch: truncate")
    assert "model.embed_tokens.weight" in line and not (tmp_path / "out").exists()

    cfg = write_config(tmp_path / "t.yml", tiny_pair["base"], bigger, embed_mismatch="truncate")
    proc = run_merge_cli(cfg, tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "warning: embed_mismatch: truncate" in proc.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert model.config.vocab_size == 2048
    emb = model.get_input_embeddings().weight.detach()
    ref = reference_slerp(0.5, load_dir(tiny_pair["base"])["model.embed_tokens.weight"],
                          load_dir(bigger)["model.embed_tokens.weight"][:2048])
    assert_bf16_close(emb, ref)


def add_tokens(model_dir, count: int) -> list:
    """Give model_dir's tokenizer `count` more special tokens, with the ids after its vocabulary."""
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    first = max(data["model"]["vocab"].values()) + 1
    names = [f"<|tool_{k}|>" for k in range(count)]
    data["added_tokens"] += [{"id": first + k, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for k, name in enumerate(names)]
    path.write_text(json.dumps(data))
    return names


def test_truncate_never_keeps_a_tokenizer_larger_than_the_kept_vocabulary(tmp_path, tiny_pair):
    """The base has 8 tokens more than the other model: truncating to the common rows must not
    keep a tokenizer that emits the cut ids. Unset tokenizer_source takes the other model's
    tokenizer; an explicit `tokenizer_source: base` is refused before anything is written."""
    from transformers import AutoConfig, AutoTokenizer

    bigger = tiny_llama(tmp_path / "bigger", 5, vocab=2056)
    tool_tokens = add_tokens(bigger, 8)
    assert len(AutoTokenizer.from_pretrained(bigger)) == 2056
    cfg = write_config(tmp_path / "t.yml", bigger, tiny_pair["base"], embed_mismatch="truncate")
    proc = run_merge_cli(cfg, tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"tokenizer, chat template and generation config come from {tiny_pair['base']}" in proc.stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert AutoConfig.from_pretrained(tmp_path / "out").vocab_size == 2048
    assert len(tok) <= 2048
    assert max(tok(" ".join(tool_tokens) + " hello")["input_ids"]) < 2048
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tiny_pair["base"] / "tokenizer.json").read_bytes()
    assert str(tiny_pair["base"]) in (tmp_path / "out" / "README.md").read_text()  # the card says where it came from

    cfg = write_config(tmp_path / "b.yml", bigger, tiny_pair["base"], embed_mismatch="truncate", tokenizer_source="base")
    line = assert_one_line_error(run_merge_cli(cfg, tmp_path / "refused"), "embed_mismatch: truncate keeps 2048",
                                 "has 2056 ids", "tokenizer_source: base")
    assert str(bigger) in line
    assert not (tmp_path / "refused").exists() and not (tmp_path / ".refused.partial").exists()


def test_verify_finds_non_finite_and_missing_tensors(tmp_path, tiny_pair, paper_merge):
    import shutil

    from core.errors import UserError
    from merge.config import MergeOptions
    from merge.publish import verify_output
    from merge.recipe import load_merge_config
    from merge.run import Merge
    from merge.shards import parse_size

    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"])
    merge = Merge(load_merge_config(str(cfg)), str(tmp_path / "unused"),
                  MergeOptions(shard_size=parse_size(SHARD), workers=1), world=1)
    out = tmp_path / "copy"
    shutil.copytree(paper_merge, out)
    verify_output(out, merge)  # the real output passes
    shard = merge.shards[1]
    victim, offset = shard.tensors[0], shard.offsets[0]
    with open(out / shard.filename, "r+b") as f:
        f.seek(offset + 2 * 3)
        f.write(b"\xc0\x7f")  # bf16 NaN in the 4th element
    with pytest.raises(UserError, match=f"'{victim.name}'.*inf/nan"):
        verify_output(out, merge)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"][merge.shards[0].tensors[0].name]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="missing"):
        verify_output(out, merge)


def test_merge_outputs_mask_credentials(tmp_path, tiny_pair):
    """A credential that reaches a recipe (here the models' folder is named with it, as a
    mistaken interpolation would put it there) is masked as <redacted> in mergekit_config.yml and
    the model card, and written into no file of the output."""
    import shutil

    secret = "hf_fakeTOKENfakeTOKENfake01"
    models = tmp_path / f"models-{secret}"
    for name in ("base", "other"):
        shutil.copytree(tiny_pair[name], models / name)
    cfg = write_config(tmp_path / "m.yml", models / "base", models / "other")
    out = tmp_path / "out"
    proc = run_merge_cli(cfg, out, "--quiet", env=offline_env(HF_TOKEN=secret))
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path}/models-<redacted>/base" in (out / "mergekit_config.yml").read_text()
    assert "models-<redacted>/other" in (out / "README.md").read_text()
    assert not [p.name for p in out.iterdir() if secret.encode() in p.read_bytes()]
