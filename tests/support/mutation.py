"""The mutation check: each core guarantee is switched off in a temporary copy of the tree, and
the tests that guard it must then fail. A guard that still passes, errors or skips means the
guarantee could break unnoticed.

    python -m tests.mutation              # every mutation, then mutmut on the pure modules
    python -m tests.mutation --fast       # the mutations with in-process guards (tests/test_mutation.py)
    python -m tests.mutation --list       # what each mutation breaks and which tests guard it
    python -m tests.mutation resume-off study-not-atomic   # by name
    python -m tests.mutation --mutmut     # only mutmut 3 on [tool.mutmut]'s modules: kill rate >= MUTMUT_MIN_KILL_RATE

A mutation is an exact text replacement; when its old text is not in its file exactly once (the
code moved on), the check stops naming the mutation, so the catalogue is kept in step with the
code. The copy is the working tree as git sees it: tracked and untracked files, with
uncommitted changes, without ignored outputs. Guards run with this interpreter's pytest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    name: str
    guarantee: str
    """What stops being true, in words."""
    path: str
    edits: Tuple[Tuple[str, str], ...]
    """(old, new) replacements applied in order; each old text must occur exactly once."""
    fast_guards: Tuple[str, ...] = ()
    """Pytest node ids (file or file::test) that take seconds: the --fast set runs these."""
    slow_guards: Tuple[str, ...] = ()
    """Launcher and integration tests that guard it too; the full check runs them as well."""

    def guards(self, fast: bool) -> Tuple[str, ...]:
        return self.fast_guards if fast else self.fast_guards + self.slow_guards


FAULTS = "tests/test_faults_train.py"
TRAIN = "tests/test_train_integration.py"
MATRIX = "tests/test_fault_matrix.py::test_cell"

MUTATIONS: Tuple[Mutation, ...] = (
    Mutation(
        "resume-off", "resume=auto resumes from the newest complete checkpoint",
        "core/checkpoints.py", (("        return str(ckpt) if ckpt else None", "        return None"),),
        slow_guards=(f"{FAULTS}::test_kill_during_the_final_save_keeps_the_checkpoint_and_the_rerun_finishes",
                     f"{TRAIN}::test_killed_run_resumes_on_the_same_trajectory",
                     f"{MATRIX}[zero3-cpt-2to1-kill-9]"),
    ),
    Mutation(
        "model-published-in-place",
        "the final model is written aside and moved in, config.json last: a failed save never looks finished",
        "train/run.py",
        (("    tmp = out / FINAL_TMP\n", "    tmp = out\n"),
         ("        shutil.rmtree(tmp, ignore_errors=True)  # an earlier, interrupted save", "        pass"),
         ("        publish_final_model(out)\n", "")),
        # The full-disk test does not guard this: config.json is written last either way, so an
        # in-place save that fails still does not look finished; the kill test sees the half model.
        slow_guards=(f"{FAULTS}::test_kill_during_the_final_save_keeps_the_checkpoint_and_the_rerun_finishes",),
    ),
    Mutation(
        "merge-published-in-place",
        "a merge writes into .<out>.partial and renames it: a killed merge leaves no output",
        "merge/run.py", (('self.tmp = self.out.parent / f".{self.out.name}.partial"', "self.tmp = self.out"),),
        slow_guards=("tests/test_merge_e2e.py::test_killed_merge_leaves_no_output_and_resumes_to_identical_bytes",),
    ),
    Mutation(
        "study-not-atomic", "study.md and study.json are each replaced whole (a reader sees old or new)",
        "orchestration/study.py",
        (('write_atomic(run / "study.md", md)', '(run / "study.md").write_text(md)'),
         ("write_atomic(run / STUDY_FILE, json.dumps(report, indent=2) + \"\\n\")",
          "(run / STUDY_FILE).write_text(json.dumps(report, indent=2) + \"\\n\")")),
        fast_guards=("tests/test_matrix_study.py::test_a_partial_report_is_replaced_whole",),
    ),
    Mutation(
        "merge-memory-whole-tensor",
        "the merger maps a bounded chunk of each tensor at a time: memory does not grow with tensor size",
        "merge/config.py", (("chunk_elements: int = option(8 * 1024 * 1024,", "chunk_elements: int = option(1 << 40,"),),
        slow_guards=("tests/test_merge_memory.py::test_merge_memory_is_flat_in_tensor_size",),
    ),
    Mutation(
        "readme-mistyped", "every README command runs as written (flags and their values included)",
        "README.md",
        (("launch/merge.py merge.yml outputs/merged --workers 2", "launch/merge.py merge.yml outputs/merged --wrokers two"),
         ("launch/synergy.py outputs/merged --json ", "launch/synergy.py outputs/merged --jsn ")),
        fast_guards=("tests/test_readme_commands.py",),
    ),
    Mutation(
        "cpt-no-progress", "CPT learns: the training and held-out losses fall",
        "train/stages/sft.py",
        (("            **common,\n",
          '            **{**common, "learning_rate": common["learning_rate"] * (1e-6 if self.name == "cpt" else 1)},\n'),),
        slow_guards=(f"{TRAIN}::test_cpt_loss_falls", f"{TRAIN}::test_cpt_eval_loss_on_the_held_out_documents_falls"),
    ),
    Mutation(
        "sft-no-progress", "full fine-tuning SFT learns: its held-out loss falls",
        "train/stages/sft.py",
        (("            **common,\n",
          '            **{**common, "learning_rate": common["learning_rate"] * (1e-6 if self.name == "sft" else 1)},\n'),),
        slow_guards=(f"{TRAIN}::test_sft_continues_from_cpt_output",),
    ),
    Mutation(
        "gradient-parameter-steps",
        "a gradient parameter is interpolated between anchors as mergekit 0.1.5 does (same tensors as mergekit)",
        "merge/params.py", (("frac = scaled - i0", "frac = 0.0"),),
        fast_guards=("tests/test_merge_math.py::test_paper_gradient_t_per_layer_hand_computed",),
        slow_guards=("tests/test_merge_vs_mergekit.py::test_same_tensors_as_mergekit",
                     "tests/test_merge_vs_mergekit.py::test_every_deterministic_method_matches_mergekit"),
    ),
    Mutation(
        "linear-not-normalized", "linear divides by the sum of the weights by default, as mergekit does",
        "merge/methods/linear.py", (('Param("normalize", True,', 'Param("normalize", False,'),),
        slow_guards=("tests/test_merge_vs_mergekit.py::test_every_deterministic_method_matches_mergekit",),
    ),
    Mutation(
        "eval-every-process-scores-all",
        "data-parallel evaluation: each process scores its share, and the results equal one process's",
        "evaluation/run.py",
        (("        lm._rank, lm._world_size = accelerator.local_process_index, accelerator.num_processes", "        pass"),),
        slow_guards=("tests/test_eval_integration.py::test_two_processes_score_a_share_each_and_match_one_process",),
    ),
    Mutation(
        "eval-samples-in-gather-order",
        "a samples file does not depend on how many processes scored it (document order)",
        "evaluation/run.py", (('sorted(rows, key=lambda row: row["doc_id"])', "list(rows)"),),
        fast_guards=("tests/test_eval_units.py::test_samples_are_written_in_document_order",),
        slow_guards=("tests/test_eval_integration.py::test_two_processes_score_a_share_each_and_match_one_process",),
    ),
    Mutation(
        "reshard-repair-off",
        "a resume on another world size continues the uninterrupted run's losses",
        "train/run.py", (("        callbacks.append(UniversalLoadRepair(resume_from))", "        pass"),),
        slow_guards=("tests/test_reshard.py::test_resume_on_another_world_size_continues_the_trajectory",
                     f"{MATRIX}[zero3-cpt-2to1-kill-9]"),
    ),
    Mutation(
        "universal-conversion-in-place",
        "a resume killed while it converts leaves nothing that counts as converted; the rerun converts again",
        "train/reshard.py",
        (("        run_converter(ckpt / tag, work / target.name)\n        slim_optimizer_state(work / target.name / \"zero\")",
          "        write_atomic(ckpt / UNIVERSAL_LATEST, target.name)\n        run_converter(ckpt / tag, target)\n"
          "        slim_optimizer_state(target / \"zero\")"),
         ("    shutil.rmtree(target, ignore_errors=True)  # renamed by a run that died before `latest_universal`\n"
          "    os.replace(work / target.name, target)\n", "")),
        slow_guards=(f"{MATRIX}[zero3-cpt-2to1-kill-9+convert-kill]",),
    ),
    Mutation(
        "reshard-shared-adam-step",
        "after a universal-checkpoint load each parameter group's Adam step counts once per step",
        "train/reshard.py", (("torch.float32, copy=True)", "torch.float32, copy=False)"),
                             ('step.to("cpu", copy=True)', 'step.to("cpu", copy=False)')),
        fast_guards=("tests/test_reshard.py::test_universal_load_repair_gives_each_group_its_own_step_and_hyperparameters",),
    ),
    Mutation(
        "preemption-no-checkpoint", "a stop signal (SLURM preemption, time limit) saves a checkpoint at the next step end",
        "train/preemption.py", (("            control.should_save = True", "            control.should_save = False"),),
        fast_guards=("tests/test_pipeline_preemption.py::test_signal_saves_and_stops_at_the_next_step_end",),
        slow_guards=(f"{MATRIX}[zero2-cpt-1to2-usr1]",),
    ),
    Mutation(
        "preemption-stops-the-last-step", "a stop signal during the last step lets the run finish and publish",
        "train/preemption.py", (("if state.global_step < state.max_steps:", "if state.global_step <= state.max_steps:"),),
        fast_guards=("tests/test_pipeline_preemption.py::test_signal_during_the_last_step_lets_the_run_finish",),
    ),
)

# mutmut 3 on pure modules with fast tests ([tool.mutmut] in pyproject.toml names them and the
# tests): it mutates every operator and constant there and reruns the tests that cover each line.
MUTMUT_MIN_KILL_RATE = 0.95


class CheckError(Exception):
    """The check cannot run as asked: one `error:` line, exit 2."""


class MutationDrift(CheckError):
    """A mutation's old text is not in its file exactly once: the catalogue needs updating."""


# ---------------------------------------------------------------------------------------------
# the temporary copy
# ---------------------------------------------------------------------------------------------
def tree_files(root: Path) -> List[str]:
    """Tracked and untracked files that git does not ignore (uncommitted changes included)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def copy_tree(root: Path, files: Iterable[str]) -> Path:
    dest = Path(tempfile.mkdtemp(prefix="df-mutation-"))
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    return dest


def mutated_text(mutation: Mutation, text: str) -> str:
    for old, new in mutation.edits:
        found = text.count(old)
        if found != 1:
            raise MutationDrift(f"mutation {mutation.name}: {mutation.path} holds {found} copies of {old!r} "
                                "(needs exactly 1): update its entry in tests/support/mutation.py")
        text = text.replace(old, new)
    return text


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.path
    path.write_text(mutated_text(mutation, path.read_text()))


def check_anchors(mutations: Sequence[Mutation], root: Path = REPO) -> None:
    for mutation in mutations:
        mutated_text(mutation, (root / mutation.path).read_text())


# ---------------------------------------------------------------------------------------------
# running the guards
# ---------------------------------------------------------------------------------------------
@dataclass
class GuardResult:
    guard: str
    result: str
    """killed (a test failed), survived (passed), errored, skipped, missing, timeout, not run"""
    seconds: float = 0.0
    detail: str = ""


def guard_exists(root: Path, guard: str) -> bool:
    file, _, test = guard.partition("::")
    path = root / file
    if not path.is_file():
        return False
    return not test or re.search(rf"^\s*(async\s+)?def {re.escape(test.split('::')[-1])}\(", path.read_text(), re.M) is not None


def guard_cases(guard: str, cases: List[ET.Element]) -> List[ET.Element]:
    """The junit test cases a node id names: a whole file, or one (possibly parametrized) test."""
    file, _, test = guard.partition("::")
    parts = test.split("::") if test else []
    module = file[:-3].replace("/", ".")
    classname = ".".join([module, *parts[:-1]])
    picked = []
    for case in cases:
        name, cls = case.get("name", ""), case.get("classname", "")
        if not cls and name == module:  # the file did not import: pytest's collection error
            picked.append(case)
        elif not parts:
            if cls == module or cls.startswith(module + "."):
                picked.append(case)
        elif cls == classname and (name == parts[-1] or name.startswith(parts[-1] + "[")):
            picked.append(case)
    return picked


def outcome(guard: str, cases: List[ET.Element]) -> GuardResult:
    mine = guard_cases(guard, cases)
    seconds = sum(float(c.get("time", 0)) for c in mine)
    failed = [c for c in mine if c.find("failure") is not None]
    if failed:
        return GuardResult(guard, "killed", seconds, f"{len(failed)} of {len(mine)} failed")
    if any(c.find("error") is not None for c in mine):
        return GuardResult(guard, "errored", seconds, "an error, not a failed assertion")
    if mine and all(c.find("skipped") is not None for c in mine):
        return GuardResult(guard, "skipped", seconds, mine[0].find("skipped").get("message", ""))
    if not mine:
        return GuardResult(guard, "not run", seconds)
    return GuardResult(guard, "survived", seconds, f"{len(mine)} passed")


def guard_env(root: Path) -> dict:
    env = dict(os.environ)
    # the copy's code, never the checkout's: drop PYTHONPATH entries that point into it
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(root)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_guards(copy: Path, guards: Sequence[str], timeout: float) -> List[GuardResult]:
    present = [g for g in guards if guard_exists(copy, g)]
    results = {g: GuardResult(g, "missing", detail="no such test in the tree") for g in guards if g not in present}
    if present:
        report = copy / ".mutation-junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               f"--junitxml={report}", *present]
        proc = subprocess.Popen(cmd, cwd=copy, env=guard_env(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the guards' launchers and ranks too
            proc.communicate()
            results.update({g: GuardResult(g, "timeout", timeout) for g in present})
            return [results[g] for g in guards]
        cases = list(ET.parse(report).getroot().iter("testcase")) if report.is_file() else []
        for g in present:
            results[g] = outcome(g, cases)
            if results[g].result == "not run":
                results[g].detail = log.strip().splitlines()[-1] if log.strip() else f"pytest exit {proc.returncode}"
    return [results[g] for g in guards]


def in_copy(files: List[str], mutation: Optional[Mutation], guards: Sequence[str], timeout: float,
            keep: bool) -> List[GuardResult]:
    copy = copy_tree(REPO, files)
    try:
        if mutation:
            apply(mutation, copy)
        return run_guards(copy, guards, timeout)
    finally:
        if keep:
            print(f"  kept {copy}", flush=True)
        else:
            shutil.rmtree(copy, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# mutmut
# ---------------------------------------------------------------------------------------------
@dataclass
class MutmutScore:
    killed: int
    total: int
    counts: Dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.killed / self.total if self.total else 0.0


def mutmut_modules() -> List[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]["source_paths"]


def run_mutmut(files: List[str], timeout: float) -> MutmutScore:
    """mutmut 3 in a copy (it writes mutants/ beside the code), configured by [tool.mutmut]."""
    import importlib.util

    if importlib.util.find_spec("mutmut") is None:
        raise CheckError("mutmut is not installed: pip install -e \".[test]\" (or pip install \"mutmut>=3.8,<4\")")
    copy = copy_tree(REPO, files)
    try:
        env = guard_env(REPO)
        subprocess.run([sys.executable, "-m", "mutmut", "run"], cwd=copy, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout, check=False)
        subprocess.run([sys.executable, "-m", "mutmut", "export-cicd-stats"], cwd=copy, env=env,
                       capture_output=True, timeout=300, check=True)
        counts = json.loads((copy / "mutants" / "mutmut-cicd-stats.json").read_text())
        survivors = subprocess.run([sys.executable, "-m", "mutmut", "results"], cwd=copy, env=env,
                                   capture_output=True, text=True, timeout=300).stdout
        for line in survivors.splitlines():
            if line.strip():
                print(f"  mutmut: {line.strip()}", flush=True)
        return MutmutScore(counts["killed"], counts["total"], counts)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def select(names: Sequence[str], fast: bool) -> List[Mutation]:
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise CheckError(f"unknown mutation {', '.join(unknown)}: python -m tests.mutation --list names them")
    chosen = [by_name[n] for n in names] if names else list(MUTATIONS)
    return [m for m in chosen if m.fast_guards] if fast else chosen


def print_catalogue(mutations: Sequence[Mutation]) -> None:
    for m in mutations:
        print(f"{m.name}  ({m.path})\n  breaks: {m.guarantee}")
        for g in m.fast_guards:
            print(f"  guard (fast): {g}")
        for g in m.slow_guards:
            print(f"  guard: {g}")


def table(rows: List[Tuple[str, GuardResult]]) -> str:
    lines = ["| mutation | guard | result | seconds |", "| --- | --- | --- | --- |"]
    for name, r in rows:
        result = f"{r.result} ({r.detail})" if r.detail else r.result
        lines.append(f"| {name} | {r.guard} | {result} | {r.seconds:.1f} |")
    return "\n".join(lines)


def check(mutations: Sequence[Mutation], fast: bool, baseline: bool, timeout: float, keep: bool = False,
          ) -> Tuple[bool, List[Tuple[str, GuardResult]]]:
    """Run the baseline (guards pass on the unmutated copy), then each mutation in its own copy.
    True when every guard of every mutation failed, and passed without it."""
    check_anchors(mutations)
    files = tree_files(REPO)
    rows: List[Tuple[str, GuardResult]] = []
    ok = True
    if baseline:
        guards = list(dict.fromkeys(g for m in mutations for g in m.guards(fast)))
        print(f"baseline: {len(guards)} guard(s) on the unmutated tree", flush=True)
        for r in in_copy(files, None, guards, timeout, keep):
            passes = r.result in ("survived", "missing")  # a missing guard shows under its mutation
            ok &= passes
            r.result = "passes" if r.result == "survived" else r.result
            rows.append(("(none)", r))
    for m in mutations:
        start = time.monotonic()
        results = in_copy(files, m, m.guards(fast), timeout, keep)
        killed = all(r.result == "killed" for r in results)
        ok &= killed
        print(f"{m.name}: {'caught' if killed else 'NOT CAUGHT'} ({time.monotonic() - start:.0f} s)", flush=True)
        for r in results:
            if r.result != "killed":
                print(f"  {r.guard}: {r.result} {r.detail}", flush=True)
            rows.append((m.name, r))
    return ok, rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--fast", action="store_true", help="only mutations with in-process guards, only those guards")
    parser.add_argument("--list", action="store_true", help="print the mutations and their guards")
    parser.add_argument("--mutmut", action="store_true", help="only mutmut, on the modules [tool.mutmut] names")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip running the guards on the unmutated tree first")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mutation's guard run (default 1800)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args(argv)
    try:
        mutations = select(args.names, args.fast)
        check_anchors(mutations)
    except CheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        print_catalogue(mutations)
        return 0
    ok = True
    if not args.mutmut:
        start = time.monotonic()
        ok, rows = check(mutations, args.fast, args.baseline, args.timeout, args.keep)
        print(table(rows))
        print(f"{sum(1 for m in mutations if all(r.result == 'killed' for n, r in rows if n == m.name))} of "
              f"{len(mutations)} mutations caught in {time.monotonic() - start:.0f} s", flush=True)
    if args.mutmut or not (args.fast or args.names):
        try:
            score = run_mutmut(tree_files(REPO), args.timeout)
        except CheckError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        passed = score.rate >= MUTMUT_MIN_KILL_RATE
        print(f"mutmut on {', '.join(mutmut_modules())}: {score.killed} of {score.total} mutants killed "
              f"({score.rate:.0%}; at least {MUTMUT_MIN_KILL_RATE:.0%} needed) {score.counts}", flush=True)
        ok &= passed
    return 0 if ok else 1
