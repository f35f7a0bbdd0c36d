"""Score a merged model against its parents: the paper's E = (P1+P2)/2 and max(P1, P2).

    python launch/synergy.py outputs/merged                      # parents from its mergekit_config.yml
    python launch/synergy.py outputs/merged --parents outputs/orpo-llama /models/Instruct \
        --data eval/preference.jsonl --json outputs/merged-synergy.json

The score is preference accuracy on held-out domain pairs (prompt, chosen, rejected), plus the
mean log-probability per token of the chosen answers: see merge/synergy.py.
"""

import sys
from pathlib import Path

# Put the repo root first: this file's own folder would otherwise shadow the `merge` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import argument_parser, exit_on_user_error  # noqa: E402

BUNDLED = str(Path(__file__).resolve().parents[1] / "data" / "materials" / "preference_chat.jsonl")


def main(argv):
    from merge.synergy import run_synergy

    parser = argument_parser("python launch/synergy.py MERGED_DIR [--parents P1 P2] [--data PAIRS]",
                             prog="launch/synergy.py", description=__doc__.splitlines()[0])
    parser.add_argument("merged", help="the merged model's directory")
    parser.add_argument("--parents", nargs="+", help="the parent models (default: from MERGED_DIR/mergekit_config.yml)")
    parser.add_argument("--data", default=BUNDLED,
                        help="preference pairs: jsonl/parquet/saved dataset (default: the bundled materials set)")
    parser.add_argument("--max-samples", type=int, help="score only the first N pairs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    run_synergy(args.merged, args.parents, args.data, args.max_samples, args.batch_size, args.json)


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
