"""Knowledge augmentation (train/augment/, launch/augment.py): the fact filter, the rules and their
registry, the published dataset and manifest, every bad input as one line, the kill-and-resume of a
sharded rewrite, and the augment step of a pipeline (plan and SLURM render). The CPT runs on the
outputs are in test_augment_integration.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import traceback

import datasets
import pytest
from tests.support.env import REPO, assert_one_line_error, launch, offline_env, run_main, tail
from tests.support.files import write_jsonl
from tests.support.models import EVAL_SHAPE, tiny_llama

from core.errors import UserError
from train.augment import generation
from train.augment import rewrite as rewriting
from train.augment.config import WRAP_PROMPTS, RulesConfig, compose_augment_config
from train.augment.rules import TASKS, augment_document
from train.augment.run import run_augment
from train.augment.text import entities, lost_fact, quantities, subject_of

LATTICE = "Nickel, chemical symbol Ni, has atomic number 28. Its lattice parameter is 3.61 Å at room temperature."


def augment_main(argv):
    """What launch/augment.py does: compose, then augment."""
    run_augment(compose_augment_config(argv))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model", **EVAL_SHAPE)


# ---------------------------------------------------------------------------------------------
# the fact-preservation filter
# ---------------------------------------------------------------------------------------------
def rewrite_with_stand_in(stand_in, documents, tiny, tmp_path, monkeypatch):
    """launch/augment.py augment=wrap on `documents`, with `stand_in(prompt, document)` as the model
    (each "generates" 7 tokens); the manifest and the published texts."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in documents])

    def fake_generator(backend, model_dir, tokenizer, rewrite, seed):
        def generate(prompts):
            return [(stand_in(p, next(d for d in documents if d in p)), 7) for p in prompts]
        return generate

    monkeypatch.setattr(generation, "make_generator", fake_generator)
    out = tmp_path / "out"
    run_augment(compose_augment_config([
        "augment=wrap", f"model.path={tiny}", f"data.cpt.path={corpus}", f"output_dir={out}",
        "augment.rewrite.system_prompt=null", "augment.rewrite.max_new_tokens=7"]))
    return json.loads((out / "manifest.json").read_text()), datasets.load_from_disk(str(out))["text"]


def test_a_changed_number_is_a_lost_fact():
    assert lost_fact(LATTICE, LATTICE.replace("3.61 Å", "3.16 Å")) == ("lost_number", "3.61 Å")


@pytest.mark.parametrize("rewrite, verdict", [
    ("Ni (nickel) is element 28; its lattice parameter is 3.61 angstrom.", None),  # a unit's other spelling
    ("Ni is element 28; its lattice parameter is 3.61 nm.", ("lost_unit", "3.61 Å")),
    ("Ni is element 28; its lattice parameter is 3.61 Å, its density 8.9 g/cm3.", ("added_number", "8.9 g/cm3")),
    ("Nickel has atomic number 28 and a lattice parameter of 3.61 Å.", ("lost_entity", "Ni")),
    ("   ", ("empty", "")),
])
def test_filter_reasons(rewrite, verdict):
    assert lost_fact(LATTICE, rewrite) == verdict


def test_a_rewrite_that_echoes_its_source_is_dropped_as_copied(tiny, tmp_path, monkeypatch):
    """A small model often answers with the paragraph itself behind a preamble: every fact is
    there, but the corpus gains no wording. Such a rewrite is dropped and counted as `copied`."""
    def stand_in(prompt: str, document: str) -> str:
        return f"The paragraph is:\n\n{document}" if "Wikipedia" in prompt else document.replace(" has ", " shows ")

    manifest, texts = rewrite_with_stand_in(stand_in, [LATTICE], tiny, tmp_path, monkeypatch)
    assert manifest["rejected"] == {"copied": 1} and manifest["rewrites"]["kept"] == 1
    assert texts == [LATTICE, LATTICE.replace(" has ", " shows ")]


def test_numbers_units_and_entities_are_found():
    text = "Marie Curie measured 1,234.5 g/cm3 and 71.7 percent of Ba-138 in Al2O3 and Ca5(PO4)3OH in Paris."
    assert [(str(q.value), q.unit) for q in quantities(text)] == [("1234.5", "g/cm3"), ("71.7", "%"), ("138", "")]
    assert {"Marie Curie", "Ba-138", "Al2O3", "Ca5(PO4)3OH", "Paris"} <= entities(text)
    assert subject_of("The chemical formula of cementite is Fe3C. Its molar mass is 179.546 g/mol.") == "cementite"


def test_a_rewrite_that_alters_a_number_never_reaches_the_corpus(tiny, tmp_path, monkeypatch):
    """The whole path with a stand-in model: the faithful style is kept, the one that turns 3.61 Å
    into 3.16 Å is dropped and counted; the published dataset never holds 3.16."""
    def stand_in(prompt: str, document: str) -> str:
        return (document.replace("3.61", "3.16") if "Wikipedia" in prompt else document).replace(" has ", " shows ")

    manifest, texts = rewrite_with_stand_in(stand_in, [LATTICE, "Copper has a density of 8.96 g/cm3."], tiny,
                                            tmp_path, monkeypatch)
    assert manifest["rejected"] == {"lost_number": 1}
    assert manifest["rewrites"]["hit_max_new_tokens"] == 4  # the stand-in "generates" 7 tokens each
    assert manifest["rewrites"]["generated"] == 4 and manifest["rewrites"]["kept"] == 3
    assert len(texts) == 2 + 3 == manifest["rows_out"]  # the sources, then the kept rewrites
    assert not any("3.16" in t for t in texts) and sum("3.61 Å" in t for t in texts) == 2
    assert manifest["source"]["rows"] == 2 and len(manifest["source"]["sha256"]) == 64
    assert manifest["tokens_out"] > manifest["tokens_in"] > 0


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------
def materials(n=6):
    return [json.loads(line)["text"] for line in (REPO / "data/materials/cpt.jsonl").read_text().splitlines()[:n]]


def test_rules_append_tasks_and_permute_deterministically():
    doc = materials(1)[0]  # "Element 56 is barium, written Ba. ..."
    first = augment_document(doc, 0, RulesConfig(), seed=1)
    assert first == augment_document(doc, 0, RulesConfig(), seed=1)
    assert first[1:] != augment_document(doc, 0, RulesConfig(), seed=2)[1:]  # another seed, another order
    with_tasks, *copies = first
    assert with_tasks.startswith(doc) and "Fill in the blank:" in with_tasks and "\nAnswer: " in with_tasks
    assert "Question: What is the atomic mass of barium?\nAnswer: 137.327 u." in augment_document(
        doc, 0, RulesConfig(max_tasks=50), seed=1)[0]
    assert len(copies) == 2
    for copy in copies:  # every fact kept, pronouns replaced by the name, sentences reordered
        assert lost_fact(doc, copy) is None
        assert " it " not in copy and "Its " not in copy and "Barium's most abundant" in copy
        assert sorted(copy.split(". ")) != copy.split(". ")


def test_a_plugin_registers_a_pattern(tmp_path, monkeypatch):
    (tmp_path / "my_patterns.py").write_text(
        "from train.augment.rules import register_task\n"
        "@register_task('symbol_quiz')\n"
        "def symbol_quiz(doc):\n"
        "    return [f'Question: Which subject is this text about?\\nAnswer: {doc.subject}']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in materials(3)])
    out = tmp_path / "out"
    try:
        run_augment(compose_augment_config([
            "augment=rules", "augment.rules.plugins=[my_patterns]", "augment.rules.tasks=[symbol_quiz]",
            "augment.rules.copies=0", f"data.cpt.path={corpus}", f"output_dir={out}"]))
    finally:  # later tests see the shipped patterns only
        TASKS.pop("symbol_quiz", None)
    texts = datasets.load_from_disk(str(out))["text"]
    assert texts[0].endswith("Question: Which subject is this text about?\nAnswer: barium") and len(texts) == 3


# ---------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing that looks finished
# ---------------------------------------------------------------------------------------------
def test_bad_input_is_one_line(tmp_path, tiny, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": LATTICE}])
    out = tmp_path / "out"
    cases = [
        ([f"data.cpt.path={empty}"], "is empty"),
        ([f"data.cpt.path={blank}"], "holds only empty `text`"),
        (["augment=wrap", f"model.path={tmp_path / 'nowhere'}", f"data.cpt.path={corpus}"], "does not exist"),
        (["augment=wrap", f"data.cpt.path={corpus}"], "random weights: set model.path"),
        (["augment=wrap", f"model.path={tiny}", "augment.rewrite.prompts.qa=Rewrite this as questions."],
         "augment.rewrite.prompts.qa has no {document} slot"),
        (["augment=wrap", f"model.path={tiny}", "augment.rewrite.styles=[poem]"], "names 'poem'"),
        (["augment=wrap", f"model.path={tiny}", "augment.rewrite.backend=vllm", f"data.cpt.path={corpus}"],
         "vllm is not installed"),
        (["augment=rules", "augment.rules.tasks=[riddle]", f"data.cpt.path={corpus}"], "'riddle', which is not registered"),
        (["augment=repeat", f"data.cpt.path={corpus}"], "exactly one of augment.repeat.match"),
        (["augment=rules", "augment.rules.copies=-1"], "augment.rules.copies=-1: must be >= 0"),
    ]
    for args, needle in cases:
        proc = run_main(augment_main, [*args, f"output_dir={out}"], capsys)
        assert_one_line_error(proc, needle)
        assert not out.exists(), args
    proc = run_main(augment_main, [f"output_dir={a_file}"], capsys)
    assert_one_line_error(proc, f"output_dir={a_file}", "existing file")
    assert a_file.read_text() == "x"
    assert not list(tmp_path.glob(".out*")), "a refused run left a work directory"


def test_an_existing_output_is_kept_or_refused(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in materials(2)])
    out = tmp_path / "out"
    args = ["augment=rules", f"data.cpt.path={corpus}", f"output_dir={out}"]
    assert run_main(augment_main, args, capsys).returncode == 0
    again = run_main(augment_main, args, capsys)
    assert again.returncode == 0 and "already holds this augmentation" in again.stdout
    assert_one_line_error(run_main(augment_main, [*args, "seed=7"], capsys), "made with other settings")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert_one_line_error(run_main(augment_main, [*args[:2], f"output_dir={model_dir}"], capsys),
                          "not an augmented dataset")


def test_repeat_matches_the_token_count_of_another_output(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in materials(6)])
    rules, repeat = tmp_path / "rules", tmp_path / "repeat"
    assert run_main(augment_main, ["augment=rules", f"data.cpt.path={corpus}", f"output_dir={rules}"], capsys).returncode == 0
    proc = run_main(augment_main, ["augment=repeat", f"augment.repeat.match={rules}", f"data.cpt.path={corpus}",
                                   f"output_dir={repeat}"], capsys)
    assert proc.returncode == 0, proc.stderr
    target = json.loads((rules / "manifest.json").read_text())["tokens_out"]
    got = json.loads((repeat / "manifest.json").read_text())
    longest = max(len(t) for t in materials(6))  # tokens < characters
    assert target <= got["tokens_out"] < target + longest
    assert set(datasets.load_from_disk(str(repeat))["text"]) == set(materials(6))


# ---------------------------------------------------------------------------------------------
# a sharded rewrite killed after its first shard resumes from it
# ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_killed_rewrite_keeps_finished_shards_and_resumes(tiny, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in materials(4)])
    out = tmp_path / "wrap"
    args = ["augment=wrap", f"model.path={tiny}", f"data.cpt.path={corpus}", f"output_dir={out}",
            "augment.rewrite.shards=2", "augment.rewrite.max_new_tokens=4", "augment.rewrite.batch_size=4"]
    killed = launch("augment.py", args, env=offline_env(**{rewriting.STOP_AFTER_ENV: "2"}), timeout=300)
    assert killed.returncode == -9, tail(killed)  # SIGKILL once shard 0 (2 documents) was written
    (work,) = tmp_path.glob(".wrap.shards-*")
    assert sorted(p.name for p in work.glob("shard-*")) == ["shard-00000-of-00002.done", "shard-00000-of-00002.jsonl"]
    assert not out.exists()  # nothing at output_dir until every shard is done
    shard0 = (work / "shard-00000-of-00002.jsonl").read_text()

    resumed = launch("augment.py", args, timeout=300)
    assert resumed.returncode == 0, tail(resumed)
    assert "1 of my 2 shards are already done" in resumed.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_shards"] == 1 and manifest["shards"] == 2
    assert manifest["rewrites"]["generated"] == 4 * 2  # every document in both styles, shard 0 generated once
    assert sum(manifest["rejected"].values()) + manifest["rewrites"]["kept"] == 8
    texts = datasets.load_from_disk(str(out))["text"]
    assert texts[: 1] == materials(1) and set(materials(4)) <= set(texts)
    kept0 = [json.loads(line)["text"] for line in shard0.splitlines() if json.loads(line)["kept"]]
    assert all(t in texts for t in kept0)
    assert not work.exists()  # assembled: the work directory is gone


PUBLISHED, LEFT_TO_ANOTHER = 0, 3
"""A rank process's exit code: it assembled the output, or it returned with its shards done."""


def augment_ranks(args: list, world: int, setup_rank=lambda rank: None) -> list:
    """run_augment(args) in `world` forked processes at once, rank k of them with RANK=k and
    WORLD_SIZE=world, after `setup_rank(k)`: each rank's exit code (PUBLISHED, LEFT_TO_ANOTHER,
    or 1 with its traceback on stderr)."""
    context = multiprocessing.get_context("fork")

    def rank_main(rank: int) -> None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), TOKENIZERS_PARALLELISM="false")
        try:
            setup_rank(rank)
            published = run_augment(compose_augment_config(args)) is not None
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(PUBLISHED if published else LEFT_TO_ANOTHER)

    ranks = [context.Process(target=rank_main, args=(rank,)) for rank in range(world)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    return [process.exitcode for process in ranks]


@pytest.fixture
def sharded_wrap(tiny, tmp_path, monkeypatch):
    """augment=wrap over 12 documents in 6 shards for 3 ranks, no filter, with a stand-in model
    that writes `<n> | <document>`; rank 2 starts generating once the other ranks' 4 shards are
    done: (arguments, documents, output)."""
    documents = materials(12)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in documents])

    def others_done() -> bool:
        return len(list(tmp_path.glob(".wrap.shards-*/*.done"))) >= 4

    def fake_generator(backend, model_dir, tokenizer, rewrite, seed):
        def generate(prompts):
            deadline = time.time() + 60
            while os.environ["RANK"] == "2" and not others_done() and time.time() < deadline:
                time.sleep(0.05)
            return [(f"{n} | {next(d for d in documents if d in p)}", 7) for n, p in enumerate(prompts)]
        return generate

    monkeypatch.setattr(generation, "make_generator", fake_generator)
    out = tmp_path / "wrap"
    args = ["augment=wrap", f"model.path={tiny}", f"data.cpt.path={corpus}", f"output_dir={out}",
            "augment.rewrite.shards=6", "augment.rewrite.filter=false", "augment.rewrite.system_prompt=null"]
    return args, documents, out


def assert_whole_output(out, documents):
    """Every document, then its rewrite in each style, in order; the work directory is gone."""
    styles = len(compose_augment_config(["augment=wrap"]).augment.rewrite.styles)
    texts = datasets.load_from_disk(str(out))["text"]
    assert texts[::styles + 1] == documents
    for i, document in enumerate(documents):
        rewrites = texts[i * (styles + 1) + 1:(i + 1) * (styles + 1)]
        assert len(rewrites) == styles and all(r.endswith(f" | {document}") for r in rewrites), rewrites
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == 6 and manifest["rewrites"]["generated"] == len(documents) * styles
    assert not list(out.parent.glob(f".{out.name}.shards-*"))


def test_the_rank_that_finishes_the_last_shard_assembles(sharded_wrap):
    """3 ranks at once, 2 shards each, rank 2 the last to finish: ranks 0 and 1 leave when their
    shards are done, rank 2 finishes the last shard and assembles the whole output, once."""
    args, documents, out = sharded_wrap
    assert augment_ranks(args, 3) == [LEFT_TO_ANOTHER, LEFT_TO_ANOTHER, PUBLISHED]
    assert_whole_output(out, documents)


def test_ranks_that_finish_together_assemble_once(sharded_wrap):
    """3 ranks whose last shards end at the same moment all find every shard done and go for the
    assembly lock; one assembles, the others leave, one of them so late that the work directory
    is already removed: the output is published once, whole, and no rank fails."""
    args, documents, out = sharded_wrap
    finish_together = multiprocessing.get_context("fork").Barrier(3)
    run_shards, enter_lock = rewriting.run_shards, rewriting.AssemblyLock.__enter__

    def setup_rank(rank):
        def shards_then_wait(*a, **k):
            _, resumed = run_shards(*a, **k)
            finish_together.wait(60)
            return True, resumed  # every rank's shards are written by now

        def after_the_assembly(lock):
            deadline = time.time() + 60
            while lock.path.parent.exists() and time.time() < deadline:
                time.sleep(0.05)
            return enter_lock(lock)

        rewriting.run_shards = shards_then_wait
        if rank == 0:  # this rank reaches the lock after another assembled and removed the work directory
            rewriting.AssemblyLock.__enter__ = after_the_assembly

    codes = augment_ranks(args, 3, setup_rank)
    assert sorted(codes) == [PUBLISHED, LEFT_TO_ANOTHER, LEFT_TO_ANOTHER] and codes[0] == LEFT_TO_ANOTHER, codes
    assert_whole_output(out, documents)


def test_shards_split_the_documents_over_the_ranks(monkeypatch):
    assert rewriting.shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert rewriting.shard_bounds(2, 8) == [(0, 1), (1, 2)]
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert rewriting.job_rank() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert rewriting.job_rank() == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rewriting.job_rank() == (1, 2)


def test_wrap_prompts_hold_the_document_slot():
    assert set(WRAP_PROMPTS) == {"easy", "wikipedia", "hard", "qa"}
    assert all(p.endswith("{document}") for p in WRAP_PROMPTS.values())
    assert "as in sentences on Wikipedia" in WRAP_PROMPTS["wikipedia"]


# ---------------------------------------------------------------------------------------------
# the augment step of a pipeline
# ---------------------------------------------------------------------------------------------
def test_study_pipeline_plans_augment_steps_before_cpt(tmp_path):
    from orchestration.checks import validate_step_configs
    from orchestration.config import compose_pipeline_job
    from orchestration.planner import plan_pipeline
    from train.augment.config import compose_augment_config
    from train.config import compose_train_config

    plan = plan_pipeline(compose_pipeline_job(["pipeline=smollm2_augment", f"root={tmp_path}"]))
    validate_step_configs(plan)
    steps = {s.name: s for s in plan.steps}
    assert [s.name for s in plan.steps if s.kind == "augment"] == ["rules", "wrap", "repeat"]
    assert steps["repeat"].depends_on == ["rules"]
    assert f"augment.repeat.match={plan.run_dir / 'rules'}" in steps["repeat"].args
    subset = REPO / "data" / "augment_subset"
    for name in ("rules", "wrap", "repeat"):  # every augmentation reads the study's subset
        assert compose_augment_config(steps[name].args).data.cpt.path == str(subset / "cpt.jsonl")
    # the corpus a CPT step trains on, as its composed config has it: `corpus:` beats the pipeline's
    # data.cpt.path, which is the default for the others
    trained_on = {name: compose_train_config(steps[name].args).data.cpt.path
                  for name in steps if name.startswith("cpt-")}
    assert trained_on == {"cpt-raw": str(subset / "cpt.jsonl"), "cpt-renderings": str(subset / "cpt_renderings.jsonl"),
                          **{f"cpt-{c}": str(plan.run_dir / c) for c in ("rules", "wrap", "repeat")}}
    for name in ("rules", "wrap", "repeat"):
        assert name in steps[f"cpt-{name}"].depends_on
    evaluated = {s.evaluates for s in plan.steps if s.kind == "eval"}
    assert evaluated == {"start", "cpt-raw", "cpt-repeat", "cpt-rules", "cpt-wrap", "cpt-renderings"}
    assert not steps["rules"].is_complete()


def test_study_dry_run_renders_the_augment_jobs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "submit.py"), "pipeline=smollm2_augment", "cluster=slurm",
         "cluster.nodes=2", "cluster.gpus_per_node=4", f"root={tmp_path}", "--dry-run"],
        cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, tail(proc)
    # printed as "# ---- <jobs dir>/NN-<step>.sbatch (not submitted)" and the script
    parts = re.split(r"^# ---- \S+/\d\d-(\S+)\.sbatch \(not submitted\)$", proc.stdout, flags=re.M)
    scripts = dict(zip(parts[1::2], parts[2::2]))
    assert "--ntasks=8" in scripts["wrap"] and "--gpus-per-node=4" in scripts["wrap"]  # a rewrite on every GPU
    assert "--ntasks=1" in scripts["rules"] and "--gpus-per-node" not in scripts["rules"]
    assert "launch/augment.py" in scripts["wrap"] and "augment=wrap" in scripts["wrap"]
    # Every task of a GPU job sees its node's GPUs and takes its own (cuda:LOCAL_RANK): sites that
    # bind one GPU per task would leave local ranks >= 1 without that device.
    srun = {name: re.search(r"^srun .*", text, flags=re.M).group(0) for name, text in scripts.items()}
    assert "--gpu-bind=none" in srun["wrap"] and "--gpu-bind" not in srun["rules"]
    trained = [name for name in scripts if name.startswith("cpt-")]
    assert trained and all("--gpu-bind=none" in srun[name] for name in trained)
    for text in scripts.values():
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


@pytest.mark.parametrize("steps, needle", [
    ("[{name: a, stage: cpt, corpus: b}, {name: b, augment: {preset: rules}}]", "not an earlier augment step"),
    ("[{name: b, augment: {preset: rules}}, {name: a, stage: sft, corpus: b}]", "only a cpt step"),
    ("[{name: b, augment: {preset: rules}}, {name: a, stage: cpt, input: b}]", "an augment step (a dataset"),
    ("[{name: b, augment: {preset: rules}, stage: cpt}]", "exactly one of stage:, merge: or augment:"),
])
def test_pipeline_references_to_augment_steps(steps, needle, tmp_path):
    from orchestration.config import compose_pipeline_job
    from orchestration.planner import plan_pipeline

    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        plan_pipeline(compose_pipeline_job(["pipeline=tiny", f"pipeline.steps={steps}", "pipeline.eval.tasks=[]",
                                            f"root={tmp_path}"]))


def test_entigraph_writes_about_entity_pairs_and_drops_invented_values(tiny, tmp_path, monkeypatch):
    """With a stand-in model: a text naming both entities is kept, one that invents a value or
    leaves an entity out is dropped and counted."""
    from train.augment.entigraph import document_entities, relation_check

    doc = materials(1)[0]  # "Element 56 is barium, written Ba. ... Ba-138 (71.7 percent)."
    assert document_entities(doc) == ["barium", "Ba", "Ba-138"]
    assert relation_check(doc, "Ba-138 is the main isotope of barium.", ("barium", "Ba-138")) is None
    assert relation_check(doc, "Barium weighs 9.9 g/cm3.", ("barium", "Ba")) == ("lost_entity", "Ba")
    assert relation_check(doc, "Ba is barium; it melts at 1000 K.", ("barium", "Ba")) == ("added_number", "1000 K")

    def fake_generator(backend, model_dir, tokenizer, rewrite, seed):
        def generate(prompts):
            out = []
            for p in prompts:
                a, b = re.search(r"Discuss how (.+?) and (.+?) are related", p).groups()
                text = {"Ba": f"{a} has 2 g/cm3.", "Ba-138": f"{a} and {b} go together."}[b]
                out.append((text.replace("go together", "weigh 2 g/cm3") if a == "Ba" else text, 5))
            return out
        return generate

    monkeypatch.setattr(generation, "make_generator", fake_generator)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": doc}])
    out = tmp_path / "out"
    run_augment(compose_augment_config(["augment=entigraph", f"model.path={tiny}", f"data.cpt.path={corpus}",
                                        f"output_dir={out}"]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rewrites"]["generated"] == 3 and manifest["rewrites"]["kept"] == 1
    assert manifest["rejected"] == {"lost_entity": 1, "added_number": 1}
    assert datasets.load_from_disk(str(out))["text"] == [doc, "barium and Ba-138 go together."]
