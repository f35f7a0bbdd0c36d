r"""Score a merged model against its parents: the paper's E = (P1+P2)/2 and max(P1, P2), for
every task and metric of their eval results (evaluation/synergy.py; docs/eval.md).

    python launch/synergy.py outputs/merged                      # parents from its mergekit_config.yml
    python launch/synergy.py outputs/merged --parents outputs/orpo-llama /models/Instruct \
        --tasks materials_cpt_mc_gen materials_cpt_mc_loglik --json outputs/merged-synergy.json
    python launch/synergy.py outputs/merged limit=100 batch_size=32   # settings for evals it must run

It reads <MODEL>/eval/<task>.json for the three models. A model missing a task is evaluated
first with launch/eval.py's engine (key=value arguments go to it); with no --tasks, the tasks
are those the merged model has results for, or the `synergy` preset (conf/eval/synergy.yaml).
"""

import sys
from pathlib import Path

# Put the repo root first: this file's own folder would otherwise shadow the packages.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import exit_on_user_error  # noqa: E402


def main(argv):
    from evaluation.synergy import run_synergy, synergy_parser

    args = synergy_parser(__doc__).parse_args(argv)
    run_synergy(args.merged, args.parents, args.tasks, args.eval_overrides, args.json)


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
