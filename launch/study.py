"""The study report of a pipeline run: every model's evaluations side by side, the change
against the start model, each merge against its parents, and the paper's plots.

    python launch/study.py outputs/pipelines/tiny
    python launch/study.py /scratch/runs/llama_instruct_grid

Writes study.md, study.json and study_*.png into the run directory (the pipeline also runs
this as its last step when pipeline.eval.tasks is set). See orchestration/study.py.
"""

import sys
from pathlib import Path

# Put the repo root first: this file's own folder would otherwise shadow the packages.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import exit_on_user_error  # noqa: E402


def main(argv):
    from orchestration.study import run_study, study_parser

    run_study(study_parser(__doc__).parse_args(argv).run_dir)


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
