"""The sbatch scripts submit.py renders, for 1, 2 and 16 nodes x 8 GPUs: resources, world size,
the per-task launch line, the afterok chain, the preemption hooks, and bash syntax; plus the
submission errors (sbatch missing, too many tasks) as one line and exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from tests.support.env import REPO, assert_one_line_error
from tests.support.models import stand_in_model

from core.errors import PREEMPTED_EXIT_CODE, UserError
from orchestration.config import compose_pipeline_job
from orchestration.job_scripts import render_step
from orchestration.planner import plan_pipeline

LLAMA = "llama_instruct_cpt_sft_orpo_slerp"


def sbatch_options(text):
    return re.findall(r"^#SBATCH (\S+)", text, flags=re.M)


def render_chain(tmp_path, *overrides):
    cfg = compose_pipeline_job([f"pipeline={LLAMA}", "cluster=slurm", f"root={tmp_path}", *overrides])
    plan = plan_pipeline(cfg)
    scripts, previous = [], None
    for i, step in enumerate(plan.steps):
        job_id = str(1000 + i)
        scripts.append(render_step(plan, step, cfg.cluster, previous)[1])
        previous = job_id
    return plan, scripts


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_rendered_scripts(nodes, tmp_path):
    plan, scripts = render_chain(
        tmp_path, f"cluster.nodes={nodes}", "cluster.gpus_per_node=8", "cluster.partition=gpu",
        "cluster.time=12:00:00", "cluster.account=proj", "cluster.signal_seconds=900",
        "cluster.setup=['source /opt/venv/bin/activate']",
    )
    cpt, sft, orpo, slerp = scripts
    for i, text in enumerate(scripts):
        options = sbatch_options(text)
        assert {"--partition=gpu", "--account=proj", "--requeue"} <= set(options)
        assert f"--job-name=df-{LLAMA}-{plan.steps[i].name}" in options  # squeue tells pipelines apart
        # Each job waits for the one before it; the first for nothing.
        deps = [o for o in options if o.startswith("--dependency")]
        assert deps == ([] if i == 0 else [f"--dependency=afterok:{1000 + i - 1}"])
        assert ("--kill-on-invalid-dep=yes" in options) == (i > 0)  # a failed chain does not hang
        assert "source /opt/venv/bin/activate" in text
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0  # valid bash

    for text in (cpt, sft, orpo):
        options = sbatch_options(text)
        assert {f"--nodes={nodes}", "--time=12:00:00"} <= set(options)
        # By default every task gets cores and every node its memory (SLURM's default is one
        # core and a few GB per core); srun takes the cores only through SRUN_CPUS_PER_TASK.
        assert {"--cpus-per-task=8", "--mem=0"} <= set(options)
        assert "export SRUN_CPUS_PER_TASK=8" in text
        assert "srun --kill-on-bad-exit=1 --label" in text  # each rank's lines carry its number
        assert f"--ntasks={nodes * 8}" in options  # world size: one task per GPU
        assert "--ntasks-per-node=8" in options and "--gpus-per-node=8" in options
        assert "--signal=B:USR1@900" in options
        assert f"# {nodes * 8} training ranks = {nodes} node(s) x 8 rank(s) per node" in text
        assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
        assert "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in text
        assert "srun --kill-on-bad-exit=1 --label --gpu-bind=none bash -c" in text  # every rank sees its node's GPUs
        assert not re.search(r"^[^#]*\b(ssh|pdsh|--hostfile)\b", text, flags=re.M)  # no ssh anywhere
        assert f"[ $status -eq {PREEMPTED_EXIT_CODE} ]" in text and "scontrol requeue $SLURM_JOB_ID" in text
        # srun turns SIGTERM into SIGKILL of every rank: the batch shell passes SIGUSR1 on for both
        assert "trap 'stop_signal=USR1; signals=$((signals + 1)); kill -USR1 $srun_pid" in text
        assert "trap 'stop_signal=TERM; signals=$((signals + 1)); kill -USR1 $srun_pid" in text
        assert "kill -TERM" not in text
    assert "launch/train.py \\\n        +stage=sft" in sft
    assert f"model.path={plan.run_dir / 'cpt'}" in sft and f"output_dir={plan.run_dir / 'sft'}" in sft
    # The merge is one CPU task on one node, sized to the numpy merger, whatever training takes.
    assert {"--nodes=1", "--ntasks=1", "--cpus-per-task=4", "--mem=4G", "--time=02:00:00"} <= set(sbatch_options(slerp))
    assert not any(o.startswith("--gpus") for o in sbatch_options(slerp))
    assert "srun --kill-on-bad-exit=1 " in slerp and "launch/merge.py" in slerp
    assert f"merge.model={plan.run_dir / 'orpo'}" in slerp
    assert "--signal" not in slerp


def test_rank_mapping_line_gives_torch_distributed_its_variables(tmp_path):
    """The per-task line, run with the variables srun sets for task 13 of 128 (local 5)."""
    _, scripts = render_chain(tmp_path, "cluster.nodes=16", "cluster.gpus_per_node=8")
    line = re.search(r"bash -c \\\n\s+('[^']+')", scripts[0]).group(1)
    env = dict(os.environ, SLURM_PROCID="13", SLURM_LOCALID="5", SLURM_NTASKS="128")
    cmd = f"bash -c {line} rank {sys.executable} -c 'import os; print(os.environ[\"RANK\"], os.environ[\"LOCAL_RANK\"], os.environ[\"WORLD_SIZE\"])'"
    out = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True).stdout.split()
    assert out == ["13", "5", "128"]


def eval_and_study_scripts(tmp_path, *overrides):
    cfg = compose_pipeline_job([f"pipeline={LLAMA}", "cluster=slurm", f"root={tmp_path}",
                                "pipeline.eval.tasks=[general_knowledge]", *overrides])
    plan = plan_pipeline(cfg)
    scripts = {s.name: render_step(plan, s, cfg.cluster, None)[1] for s in plan.steps if s.kind in ("eval", "study")}
    return scripts.pop("study"), scripts


def test_eval_job_starts_one_evaluation_process_per_allocated_gpu(tmp_path):
    study, evals = eval_and_study_scripts(tmp_path, "cluster.nodes=4", "cluster.gpus_per_node=8")
    assert evals
    for text in evals.values():
        options = sbatch_options(text)
        # one node (a model copy per GPU, or one process over all of them), 8 tasks on it, 8 GPUs
        assert {"--nodes=1", "--ntasks=8", "--ntasks-per-node=8", "--gpus-per-node=8"} <= set(options)
        srun = re.search(r"^srun .*", text, flags=re.M).group(0)
        assert "--gpu-bind=none" in srun  # every task sees every GPU: lm-eval puts rank i on GPU i
        assert "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in text
        assert "launch/eval.py" in text.split(srun)[1] and "MASTER_PORT=$((10000 + SLURM_JOB_ID % 22768))" in text
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    # the study report stays one CPU task
    assert "--ntasks=1" in sbatch_options(study) and not any(o.startswith("--gpus") for o in sbatch_options(study))

    # the per-task line, run with the variables srun sets for task 5 of 8
    line = re.search(r"bash -c \\\n\s+('[^']+')", next(iter(evals.values()))).group(1)
    env = dict(os.environ, SLURM_PROCID="5", SLURM_LOCALID="5", SLURM_NTASKS="8")
    show = "import os; print(*(os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE')))"
    out = subprocess.run(f"bash -c {line} rank {sys.executable} -c \"{show}\"", shell=True, env=env,
                         capture_output=True, text=True).stdout.split()
    assert out == ["5", "5", "8", "8"]


def test_eval_job_on_a_cpu_partition_binds_no_gpus(tmp_path):
    _, evals = eval_and_study_scripts(tmp_path, "cluster.gpus_per_node=4", "cluster.request_gpus=false")
    text = next(iter(evals.values()))
    assert "--ntasks=4" in sbatch_options(text) and not any(o.startswith("--gpus") for o in sbatch_options(text))
    assert "--gpu-bind" not in text


def test_cpu_partition_and_fewer_tasks(tmp_path):
    _, scripts = render_chain(tmp_path, "cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.tasks=6",
                              "cluster.request_gpus=false", "cluster.merge_tasks=3")
    options = sbatch_options(scripts[0])
    assert {"--nodes=2", "--ntasks=6", "--ntasks-per-node=3"} <= set(options)
    assert not any(o.startswith("--gpus") for o in options)
    assert "srun --kill-on-bad-exit=1 --label bash -c" in scripts[0]  # no --gpu-bind without GPUs
    assert {"--nodes=1", "--ntasks=3"} <= set(sbatch_options(scripts[-1]))
    assert "srun --kill-on-bad-exit=1 --label" in scripts[-1]


def test_more_tasks_than_gpus_is_refused():
    with pytest.raises(UserError, match=r"cluster.tasks=17 is more than cluster.nodes x cluster.gpus_per_node = 2 x 8 = 16"):
        compose_pipeline_job(["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=8", "cluster.tasks=17"])


def run_submit(args, env=None, tmp_path=None):
    return subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)


def test_sbatch_missing_is_one_line_saying_how_to_run_locally(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    proc = run_submit(["pipeline=tiny", f"root={tmp_path}"], env=env)
    assert_one_line_error(proc, "sbatch not found", "python launch/pipeline.py pipeline=<name>")
    assert proc.returncode == 2
    assert not (tmp_path / "tiny").exists()


def test_dry_run_prints_every_script_and_submits_nothing(tmp_path):
    proc = run_submit(["pipeline=tiny", f"root={tmp_path}", "cluster.gpus_per_node=2", "--dry-run"],
                      env=dict(os.environ, PATH=str(tmp_path)))  # no sbatch needed for a dry run
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 7 training/merge steps, 8 evaluations (one of them the first CPT epoch), the study
    assert proc.stdout.count("#!/bin/bash") == 16
    # Each job waits for the steps it reads: orpo for sft (not dpo), the merge for both its models.
    scripts = {part.split(".sbatch")[0].split("/jobs/")[1].split("-", 1)[1]: part
               for part in proc.stdout.split("# ---- ")[1:]}
    assert "--dependency=afterok:<job of sft>\n" in scripts["orpo"]
    assert "--dependency=afterok:<job of sft>:<job of orpo>" in proc.stdout
    assert "--dependency=afterok:<job of orpo>\n" in scripts["eval-orpo"] and "launch/eval.py" in scripts["eval-orpo"]
    evals = ":".join(f"<job of {n}>" for n in ["eval-cpt-epoch-1", "eval-cpt", "eval-sft", "eval-dpo", "eval-orpo",
                                                "eval-slerp-dpo", "eval-slerp", "eval-linear"])
    assert f"--dependency=afterok:{evals}\n" in scripts["study"] and "launch/study.py" in scripts["study"]
    assert not (tmp_path / "tiny").exists()


def test_cpus_and_memory_are_set_or_left_to_the_partition(tmp_path):
    _, scripts = render_chain(tmp_path, "cluster.cpus_per_task=4", "cluster.mem=200G")
    assert {"--cpus-per-task=4", "--mem=200G"} <= set(sbatch_options(scripts[0]))
    assert "export SRUN_CPUS_PER_TASK=4" in scripts[0]
    _, scripts = render_chain(tmp_path, "cluster.cpus_per_task=null", "cluster.mem=null")
    options = sbatch_options(scripts[0])
    assert not any(o.startswith(("--cpus-per-task", "--mem")) for o in options)
    assert "SRUN_CPUS_PER_TASK" not in scripts[0]


def dry_run_scripts(stdout: str) -> dict:
    """{step name: its rendered sbatch script} from submit.py --dry-run's output."""
    return {part.split(".sbatch")[0].split("/jobs/")[1].split("-", 1)[1]: part for part in stdout.split("# ---- ")[1:]}


GRID_MERGES = {"slerp-orpo": "paper_slerp", "linear-orpo": "linear_average", "ties-orpo": "ties_half",
               "slerp-dpo": "paper_slerp", "linear-dpo": "linear_average", "ties-dpo": "ties_half"}


def test_grid_dry_run_renders_each_merge_method_of_the_same_parents(tmp_path, fake_flash_attn):
    """llama_instruct_grid merges each preference model with the Instruct model by SLERP, linearly
    and by TIES: the dry run renders every one as a merge job of the same parents, each evaluated,
    and the study waits for all of them."""
    start = stand_in_model(tmp_path / "models" / "Meta-Llama-3.1-8B-Instruct")
    proc = run_submit(["pipeline=llama_instruct_grid", "cluster=slurm", f"root={tmp_path}",
                       f"pipeline.start={start}", "data.allow_demo=true", "--dry-run"],
                      env=dict(os.environ, PATH=str(tmp_path), PYTHONPATH=str(fake_flash_attn)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    scripts = dry_run_scripts(proc.stdout)
    run = tmp_path / "llama_instruct_grid"
    for name, preset in GRID_MERGES.items():
        parent = name.split("-", 1)[1]
        text = scripts[name]
        assert "launch/merge.py" in text and f" merge={preset} \\\n" in text
        assert f"merge.base_model={start}" in text
        assert f"merge.model={run / parent}" in text and f"output_dir={run / name}\n" in text
        assert f"--dependency=afterok:<job of {parent}>\n" in text
        assert f"--dependency=afterok:<job of {name}>\n" in scripts[f"eval-{name}"]
        assert f"<job of eval-{name}>" in scripts["study"]
    assert not run.exists()


def test_each_kind_of_job_asks_for_what_it_uses(tmp_path):
    """Training takes the cluster-wide resources; a merge no GPU node's whole memory; evaluations
    and the study short limits."""
    cfg = compose_pipeline_job([f"pipeline={LLAMA}", "cluster=slurm", f"root={tmp_path}", "cluster.nodes=2",
                                "cluster.gpus_per_node=8", "pipeline.eval.tasks=[general_knowledge]"])
    plan = plan_pipeline(cfg)
    options = {s.name: set(sbatch_options(render_step(plan, s, cfg.cluster, None)[1])) for s in plan.steps}
    assert {"--nodes=2", "--mem=0", "--gpus-per-node=8", "--time=24:00:00"} <= options["cpt"]
    merge = options["slerp"]
    assert {"--nodes=1", "--ntasks=1", "--cpus-per-task=4", "--mem=4G", "--time=02:00:00"} <= merge
    assert not any(o.startswith(("--gpus", "--mem=0")) for o in merge)
    assert {"--nodes=1", "--time=04:00:00", "--gpus-per-node=8"} <= options["eval-slerp"]
    assert {"--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--mem=4G", "--time=00:30:00"} <= options["study"]


def test_resources_are_overridden_per_kind_and_per_step(tmp_path):
    _, scripts = render_chain(tmp_path, "cluster.resources.merge.partition=cpu", "cluster.resources.merge.mem=16G",
                              "cluster.resources.train.time=2-00:00:00", "cluster.partition=gpu", "cluster.nodes=2",
                              "cluster.gpus_per_node=8", "pipeline.steps.2.resources.nodes=1")
    cpt, _, orpo, slerp = (set(sbatch_options(t)) for t in scripts)
    assert {"--partition=cpu", "--mem=16G", "--time=02:00:00"} <= slerp
    assert {"--partition=gpu", "--nodes=2", "--ntasks=16", "--time=2-00:00:00"} <= cpt
    assert {"--nodes=1", "--ntasks=8"} <= orpo  # the step's own: one node


@pytest.mark.parametrize("override, key, accepted", [
    ("cluster.time=banana", "cluster.time=banana", "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    ("cluster.mem=lots", "cluster.mem=lots", "<integer>[K|M|G|T]"),
    ("cluster.resources.eval.time=1h", "cluster.resources.eval.time=1h", "HH:MM:SS"),
    ("cluster.partition=gpu a100", "cluster.partition=gpu a100", "without spaces"),
])
def test_bad_slurm_values_are_one_line(override, key, accepted, tmp_path):
    proc = run_submit(["pipeline=tiny", f"root={tmp_path}", override, "--dry-run"],
                      env=dict(os.environ, PATH=str(tmp_path)))
    assert_one_line_error(proc, key, accepted)


@pytest.mark.parametrize("value", ["90", "30:00", "12:00:00", "2-00", "1-12:30", "7-00:00:00", "UNLIMITED"])
def test_slurm_time_formats_are_accepted(value, tmp_path):
    _, scripts = render_chain(tmp_path, f"cluster.time={value}")
    assert f"--time={value}" in sbatch_options(scripts[0])


def test_setup_runs_before_strict_mode_and_its_python_runs_the_job(tmp_path):
    _, scripts = render_chain(tmp_path, "cluster.setup=['module load cuda # site', 'conda activate df']",
                              "+cluster.env.HF_HOME=/scratch/$USER/hf", "+cluster.env.HF_HUB_OFFLINE=1")
    for text in scripts:
        strict = re.search(r"^set -e?uo pipefail$", text, flags=re.M).start()
        assert text.index("conda activate df") < strict and text.index("module load cuda") < strict
        assert re.search(r" python \\\n +launch/", text)  # the setup's python, from PATH
        assert 'export HF_HOME="/scratch/$USER/hf"' in text and 'export HF_HUB_OFFLINE="1"' in text
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def run_setup_block(text, tmp_path):
    """The rendered setup lines, run in bash up to strict mode."""
    setup = text[text.index("# cluster.setup"):re.search(r"^set -e?uo pipefail$", text, flags=re.M).start()]
    return subprocess.run(["bash", "-c", setup + "echo setup-done"], capture_output=True, text=True, cwd=tmp_path)


def test_a_failing_setup_line_ends_the_job_and_unset_variables_do_not(tmp_path):
    _, scripts = render_chain(tmp_path, "cluster.setup=['echo $NOT_SET_ANYWHERE ok # reads an unset variable']")
    assert run_setup_block(scripts[0], tmp_path).stdout.split() == ["ok", "setup-done"]
    _, scripts = render_chain(tmp_path, "cluster.setup=['ls /nonexistent-dir', 'echo never']")
    proc = run_setup_block(scripts[0], tmp_path)
    assert proc.returncode == 1 and "never" not in proc.stdout
    assert "domainforge: cluster.setup line failed: ls /nonexistent-dir" in proc.stderr


def script_part(text, first, before):
    """The rendered script from the line starting with `first` up to the line starting with `before`."""
    start = re.search(rf"^{re.escape(first)}", text, flags=re.M).start()
    return text[start:re.search(rf"^{re.escape(before)}", text, flags=re.M).start()]


def stand_in_commands(tmp_path, job_text=""):
    """scontrol (show job prints `job_text`, requeue and the rest are logged), scancel (logged), and
    a sleep that returns at once; returns (bin dir, log of calls)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "job.txt").write_text(job_text)
    commands = {
        "scontrol": f'#!/bin/sh\nif [ "$1 $2" = "show job" ]; then cat {tmp_path / "job.txt"}; '
                    f'elif [ "$1" = show ]; then printf "node-a\\nnode-b\\n"; else echo scontrol "$@" >> {calls}; fi\n',
        "scancel": f'#!/bin/sh\necho scancel "$@" >> {calls}\n',
        "sleep": "#!/bin/sh\nexit 0\n",
    }
    for name, body in commands.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir, calls


def run_bash(code, bin_dir, cwd, **env):
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    full.pop("SLURM_RESTART_COUNT", None)
    full.update(env)
    return subprocess.run(["bash", "-c", code], env=full, capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("restarts, requeued", [(None, True), ("1", True), ("2", False), ("5", False)])
def test_self_requeue_stops_at_the_cap(restarts, requeued, tmp_path):
    """The rendered requeue function, run in bash with a stand-in scontrol: past
    cluster.max_requeues the job exits non-zero (afterok dependents are cancelled) and does not requeue."""
    _, scripts = render_chain(tmp_path, "cluster.max_requeues=2")
    bin_dir, calls = stand_in_commands(tmp_path)
    functions = script_part(scripts[0], "newest_checkpoint() {", "# One task per GPU")
    env = {} if restarts is None else {"SLURM_RESTART_COUNT": restarts}
    proc = run_bash(f"status={PREEMPTED_EXIT_CODE}\ncheckpoint_at_start=\n{functions}requeue_self 'SIGUSR1'", bin_dir, tmp_path, **env)
    called = calls.read_text() if calls.exists() else ""
    if requeued:
        assert proc.returncode == 0 and called == "scontrol requeue 42\n"
        assert "domainforge: SIGUSR1: srun exited with status 75, no checkpoint yet; requeueing job 42" in proc.stdout
    else:
        assert proc.returncode == PREEMPTED_EXIT_CODE and called == ""
        assert "the cap is cluster.max_requeues=2: not requeueing" in proc.stderr


SAVED = "checkpoint-7 was written by this job"
NOT_SAVED = "no checkpoint was written by this job (the newest is checkpoint-5)"


@pytest.mark.parametrize("stop_signal, status, saved, job, calls, exit_code, says", [
    # the time-limit warning, or scancel --signal=USR1 --batch: requeue
    ("USR1", PREEMPTED_EXIT_CODE, True, "JobState=RUNNING PreemptTime=None", "scontrol requeue 42", 0,
     ["SIGUSR1 (the time-limit warning", SAVED, "requeueing job 42"]),
    # scancel --signal=TERM --batch: the job alone asked to stop: cancelled, not requeued
    ("TERM", 143, True, "JobState=RUNNING PreemptTime=None", "scancel 42", PREEMPTED_EXIT_CODE,
     ["scancel --signal=TERM --batch", SAVED, "cancelling the job, not requeueing"]),
    # a preemption with GraceTime: SIGTERM to the ranks only, PreemptTime set: requeue, whatever
    # status srun got (--kill-on-bad-exit terminates the ranks that exit after the first)
    ("", 143, True, "JobState=RUNNING PreemptTime=2026-12-05T14:48:38", "scontrol requeue 42", 0,
     ["preempted (PreemptTime=2026-12-05T14:48:38)", SAVED]),
    # SLURM ending the job (plain scancel, scontrol requeue, preemption without GraceTime): SLURM
    # decides, and the log says whether the ranks saved in KillWait
    ("TERM", 137, False, "JobState=COMPLETING PreemptTime=None", "", 137,
     ["SLURM is ending job 42 (JobState=COMPLETING): the ranks had SIGTERM and KillWait seconds", NOT_SAVED]),
    ("TERM", PREEMPTED_EXIT_CODE, True, "JobState=COMPLETING PreemptTime=None", "", PREEMPTED_EXIT_CODE,
     ["SLURM is ending job 42 (JobState=COMPLETING)", SAVED]),
    # the ranks stopped on a signal sent to the job's steps (scancel --signal=USR1 <job>): requeue
    ("", PREEMPTED_EXIT_CODE, True, "JobState=RUNNING PreemptTime=None", "scontrol requeue 42", 0, [SAVED]),
    # a crash is not requeued
    ("", 1, False, "JobState=RUNNING PreemptTime=None", "", 1, []),
    # a USR1 that found the ranks crashing: requeued, and the log says nothing was saved
    ("USR1", 1, False, "JobState=RUNNING PreemptTime=None", "scontrol requeue 42", 0, [NOT_SAVED]),
])
def test_what_the_batch_script_does_after_each_stop(stop_signal, status, saved, job, calls, exit_code, says, tmp_path):
    """The rendered decision after srun returns, run in bash with stand-in scontrol and scancel: each
    way SLURM stops a job (as measured on SLURM 22.05 by tests/test_slurm_cluster.py) leads to a
    requeue, a cancellation or SLURM's own handling, and the log says only what happened."""
    plan, scripts = render_chain(tmp_path)
    text = scripts[0]
    checkpoints = plan.steps[0].output_dir / "checkpoints"
    for step in (5, 7) if saved else (5,):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (checkpoints / "checkpoint-9").mkdir()  # incomplete: no trainer_state.json
    bin_dir, called = stand_in_commands(tmp_path, f"JobId=42 {job.split()[0]} Reason=None\n   {job.split()[1]}\n")
    code = (f"status={status}\nstop_signal={stop_signal}\nstarted=$(mktemp)\ncheckpoint_at_start=5\n"
            + script_part(text, "newest_checkpoint() {", "# One task per GPU")
            + script_part(text, "job=$(scontrol show job", "# config.json is written last") + "exit $status\n")
    proc = run_bash(code, bin_dir, tmp_path)
    assert proc.returncode == exit_code, proc.stdout + proc.stderr
    assert (called.read_text().strip() if called.exists() else "") == calls
    for words in says:
        assert words in proc.stdout + proc.stderr
    if not saved:
        assert SAVED not in proc.stdout + proc.stderr


@pytest.mark.parametrize("job_id", ["5", "10005", "22773", "999999"])
def test_the_prologue_survives_unset_variables_in_setup_and_picks_a_port_below_the_ephemeral_range(job_id, tmp_path):
    """The training script up to the launch, run in bash: a setup line that reads an unset variable
    passes (strict mode comes after it); MASTER_ADDR is the first host of the node list and
    MASTER_PORT lies in 10000-32767, outside Linux's ephemeral ports (32768-60999), and differs for
    job ids 10000 apart."""
    _, scripts = render_chain(tmp_path, "cluster.setup=['echo setup-ok $NOT_SET_ANYWHERE']")
    bin_dir, _ = stand_in_commands(tmp_path)
    prologue = script_part(scripts[0], "cd ", "started=$(mktemp)")
    proc = run_bash(prologue + 'echo "rendezvous $MASTER_ADDR $MASTER_PORT"', bin_dir, tmp_path,
                    SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="node-[a-b]")
    assert proc.returncode == 0, proc.stderr
    assert "setup-ok" in proc.stdout
    port = int(re.search(r"^rendezvous node-a (\d+)$", proc.stdout, flags=re.M).group(1))
    assert 10000 <= port < 32768 and port == 10000 + int(job_id) % 22768
    assert port != 10000 + (int(job_id) + 10000) % 22768


def test_strict_mode_follows_the_setup_in_every_kind_of_job(tmp_path):
    """Train, merge, eval, the study and augment jobs: `set -u` only after cluster.setup."""
    _, chain = render_chain(tmp_path, "cluster.setup=['conda activate df']")
    study, evals = eval_and_study_scripts(tmp_path, "cluster.setup=['conda activate df']")
    cfg = compose_pipeline_job(["pipeline=smollm2_augment", "cluster=slurm", f"root={tmp_path}",
                                "cluster.setup=['conda activate df']"])
    plan = plan_pipeline(cfg)
    augments = [render_step(plan, s, cfg.cluster, None)[1] for s in plan.steps if s.kind == "augment"]
    assert augments
    for text in [*chain, study, *evals.values(), *augments]:
        strict = re.search(r"^set -e?uo pipefail$", text, flags=re.M).start()
        assert text.index("conda activate df") < strict
        assert not re.search(r"^set .*u", text[:strict], flags=re.M)


def test_dry_run_prints_each_jobs_resources(tmp_path):
    proc = run_submit(["pipeline=tiny", f"root={tmp_path}", "--dry-run"], env=dict(os.environ, PATH=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^# cpt +train +1 +8 +8 +8 +0 +24:00:00 ", proc.stdout, flags=re.M), proc.stdout[-3000:]
    assert re.search(r"^# slerp +merge +1 +1 +0 +4 +4G +02:00:00 ", proc.stdout, flags=re.M)
    assert re.search(r"^# study +study +1 +1 +0 +1 +4G +00:30:00 ", proc.stdout, flags=re.M)
