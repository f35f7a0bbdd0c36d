"""launch/eval.py end to end: both protocols on a tiny Llama and on SmolLM2-135M-Instruct (its
GGUF package), known answers, and bad input. Each run is one real command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tests.support.env import REPO, assert_one_line_error, launch
from tests.support.eval_sets import KNOWN_ANSWER_FAVOUR, known_answer_sets
from tests.support.files import write_jsonl
from tests.support.models import EVAL_SHAPE, tiny_llama

def results_of(folder: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model", **EVAL_SHAPE)


def assert_items_are_the_samples(eval_dir: Path, task: str, record: dict) -> None:
    """The per-item file (the study's input) holds each question's fact, answer and option
    log-likelihoods as lm-eval logged them, and its accuracy is the task's."""
    from evaluation.items import load_items

    items = load_items(eval_dir, task)
    samples = [json.loads(line) for line in (eval_dir / f"{task}.samples.jsonl").read_text().splitlines()]
    assert items.doc_ids == [s["doc_id"] for s in samples]
    assert items.facts == [s["doc"]["fact_id"] for s in samples] and "|" in items.facts[0]
    assert items.answers == [s["target"] for s in samples]
    assert items.loglik == [[r[0] for r in s["filtered_resps"]] for s in samples] and len(items.loglik[0]) == 4
    assert items.correct.tolist() == [max(ll) == ll[a] for ll, a in zip(items.loglik, items.answers)]
    assert items.correct.mean() == record["results"]["acc,none"]


@pytest.mark.integration
def test_tiny_model_both_protocols_on_bundled_tasks(tiny):
    from core.model_card import lineage_record, write_model_card

    write_model_card(tiny, lineage_record({"kind": "model", "name": "tiny", "output": str(tiny)}, []))
    assert "No results yet" in (tiny / "README.md").read_text()
    tasks = "[knowledge_cpt_mc_loglik,materials_cpt_mc_gen,materials_sft_tf_loglik,materials_sft_tf_gen]"
    proc = launch("eval.py", [str(tiny), f"tasks={tasks}", "limit=6"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = results_of(tiny / "eval")
    assert sorted(found) == sorted(tasks.strip("[]").split(","))
    for task, record in found.items():
        assert record["n"] == 6 and record["chat_template"] is True, task
        assert record["versions"]["lm_eval"] == "0.4.13" and record["task_config"]["task"] == task
        samples = (tiny / "eval" / f"{task}.samples.jsonl").read_text().splitlines()
        assert len(samples) == 6 and "<|im_start|>user" in json.loads(samples[0])["arguments"][0][0]
    assert found["knowledge_cpt_mc_loglik"]["output_type"] == "multiple_choice"
    assert {"acc,none", "acc_norm,none"} <= set(found["knowledge_cpt_mc_loglik"]["results"])
    assert_items_are_the_samples(tiny / "eval", "knowledge_cpt_mc_loglik", found["knowledge_cpt_mc_loglik"])
    assert not (tiny / "eval" / "materials_cpt_mc_gen.items.jsonl").exists()  # generation: no options to score
    assert "exact_match,letter" in found["materials_cpt_mc_gen"]["results"]
    assert "You respond with one word or letter" in found["materials_cpt_mc_gen"]["task_config"]["doc_to_text"]
    for line in ("materials_cpt_mc_gen", "gen (greedy), chat template", "loglik, chat template", "95% interval"):
        assert line in proc.stdout
    assert not list((tiny / "eval").glob("*.tmp"))
    card = (tiny / "README.md").read_text()  # the model card now lists the results beside it
    assert "No results yet" not in card and all(task in card for task in found)


@pytest.mark.integration
def test_known_answers_score_one_and_shuffled_answers_score_chance(tmp_path):
    """A model that always says " A" (then "A"): an eval set whose answer is always option A
    ("A") scores 1.0 under both protocols; the same questions with the answer letters spread
    evenly over A-D score 0.25. Plain prompts and chat template both."""
    model = tiny_llama(tmp_path / "favours_a", **EVAL_SHAPE, favour=KNOWN_ANSWER_FAVOUR)
    files = known_answer_sets(tmp_path)
    for chat in ("true", "false"):
        out = tmp_path / f"chat-{chat}"
        proc = launch("eval.py", [str(model), "tasks=[]", f"eval_sets=[{files[0]},{files[1]}]",
                                  f"chat_template={chat}", f"output_dir={out}"], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = {task: rec["results"] for task, rec in results_of(out).items()}
        assert r["right_loglik"]["acc,none"] == 1.0 and r["right_loglik"]["acc_norm,none"] == 1.0, chat
        assert r["right_gen"]["exact_match,letter"] == 1.0, chat
        assert r["shuffled_loglik"]["acc,none"] == 0.25 and r["shuffled_gen"]["exact_match,letter"] == 0.25, chat


@pytest.mark.integration
def test_smollm2_from_its_gguf_package_both_protocols(tmp_path):
    """The real model through lm-eval's HF backend with gguf_file; on the first 16 general
    questions log-likelihood scoring beats chance and greedy answers keep their measured score."""
    pytest.importorskip("gguf")
    out = tmp_path / "smol"
    proc = launch("eval.py", ["eval=smollm2_gguf", "tasks=[general_mc_loglik,general_mc_gen]", "limit=16",
                              f"output_dir={out}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = results_of(out)
    assert sorted(found) == ["general_mc_gen", "general_mc_loglik"]
    assert found["general_mc_loglik"]["settings"]["model_args"] == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert found["general_mc_loglik"]["results"]["acc,none"] >= 0.5
    # greedy answers, measured 7 of 16 right (CPU, fp32); a question or two may flip elsewhere, chance is 4
    assert found["general_mc_gen"]["results"]["exact_match,letter"] == pytest.approx(7 / 16, abs=2 / 16)


@pytest.mark.integration
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny):
    out = tmp_path / "out"

    def run(*args):
        return launch("eval.py", [*map(str, args), f"output_dir={out}"], timeout=300)

    assert_one_line_error(run(tmp_path / "nope", "tasks=[general_mc_gen]"), "nope", "not a model directory")
    assert_one_line_error(run(tiny, "tasks=[no_such_task]"), "unknown task 'no_such_task'")

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "typo.yaml").write_text("include: " + str(REPO / "evaluation/tasks/_mc_loglik_template_yaml")
                                     + "\ntask: typo_task\ndoc_to_txt: '{{question}}'\n")
    assert_one_line_error(run(tiny, "tasks=[typo_task]", f"include_path=[{tasks}]"), "typo_task", "doc_to_txt")

    outside = write_jsonl(tmp_path / "outside.jsonl", [{"question": "Q?", "options": ["a", "b", "c", "d"],
                                                        "answer": "E"}])
    assert_one_line_error(run(tiny, "tasks=[]", f"eval_sets=[{outside}]"), "outside.jsonl", "not one of the option")
    (tmp_path / "empty.jsonl").write_text("")
    assert_one_line_error(run(tiny, "tasks=[]", f"eval_sets=[{tmp_path / 'empty.jsonl'}]"), "empty.jsonl", "empty")
    # the same bad file reached through a task YAML fails the same way, before the model loads
    (tasks / "bad_data.yaml").write_text("include: " + str(REPO / "evaluation/tasks/_mc_gen_template_yaml")
                                         + f"\ntask: bad_data\ndataset_kwargs:\n  data_files: {outside}\n")
    assert_one_line_error(run(tiny, "tasks=[bad_data]", f"include_path=[{tasks}]"), "outside.jsonl",
                          "not one of the option")
    assert not out.exists()


@pytest.mark.integration
def test_synergy_evaluates_missing_results_first(tmp_path, tiny):
    """launch/synergy.py on three models without results: each is evaluated (with the given
    settings) and compared; three identical models sit exactly at the parents' mean."""
    import shutil
    import subprocess
    import sys

    from tests.support.env import offline_env

    models = {}
    for name in ("p1", "p2", "merged"):
        models[name] = tmp_path / name
        shutil.copytree(tiny, models[name], ignore=shutil.ignore_patterns("eval"))
    (models["merged"] / "mergekit_config.yml").write_text(
        f"merge_method: slerp\nbase_model: {models['p2']}\nmodels:\n  - model: {models['p1']}\n"
        f"  - model: {models['p2']}\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "synergy.py"), str(models["merged"]), "limit=4",
                           "--tasks", "materials_sft_mc_loglik", "--json", str(tmp_path / "s.json")],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in models.values():
        assert json.loads((path / "eval" / "materials_sft_mc_loglik.json").read_text())["n"] == 4
    acc = json.loads((tmp_path / "s.json").read_text())["tasks"]["materials_sft_mc_loglik"]["acc"]
    assert acc["P1"] == acc["P2"] == acc["merged"] and acc["merged-E"] == 0.0
    assert acc["verdict"] == "at the parents' mean, within noise"


@pytest.mark.integration
def test_two_processes_score_a_share_each_and_match_one_process(tmp_path, tiny):
    """The data-parallel form a pipeline's eval step launches (torch.distributed.run, one process
    per GPU), here with 2 CPU processes over gloo: each scores half of the requests, rank 0 alone
    writes, and the files match a 1-process run (metrics up to float summation order)."""
    import re

    from tests.support.env import offline_env

    from orchestration.local import eval_command

    tasks = ["materials_cpt_mc_loglik", "materials_cpt_mc_gen"]
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        cmd = eval_command(str(REPO / "launch" / "eval.py"),
                           [str(tiny), f"tasks=[{','.join(tasks)}]", "limit=10", f"output_dir={out}"], processes)
        proc = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        # 10 questions x 4 options = 40 log-likelihood requests, split over the processes (rank 0's bar)
        bars = re.findall(r"Running loglikelihood requests: 100%\S* \d+/(\d+)", proc.stderr)
        assert [int(total) for total in bars] == [40 // processes], bars
        assert proc.stdout.count("results: ") == 1  # one table, one writer
        runs[processes] = (results_of(out), {t: (out / f"{t}.samples.jsonl").read_text() for t in tasks})

    (one, one_samples), (two, two_samples) = runs[1], runs[2]
    assert sorted(one) == sorted(two) == sorted(tasks)
    assert one_samples == two_samples  # per-question answers and scores, byte for byte
    for task in tasks:
        assert one[task]["n"] == two[task]["n"] == 10
        for metric, value in one[task]["results"].items():
            assert two[task]["results"][metric] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value)
        differ = {k for k in one[task] if one[task][k] != two[task][k]}
        assert differ <= {"results", "settings", "finished_at"}, differ
        settings = one[task]["settings"], two[task]["settings"]
        assert {k for k in settings[0] if settings[0][k] != settings[1][k]} == {"output_dir"}
