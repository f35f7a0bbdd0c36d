"""launch/merge.py's two command lines, turned into (recipe, output directory, options):

    CONFIG.yml OUT_DIR [--workers W] [--verify] ...     mergekit-yaml's form (argparse)
    merge=<preset> merge.model=... output_dir=... [--cfg] the Hydra form (conf/merge_job.yaml)
"""

from __future__ import annotations

from typing import List, Tuple

from core.cli import without_cli_flags
from core.errors import argument_parser
from merge import methods
from merge.config import MERGE_COMMAND, MergeOptions, add_merge_options, options_from, recipe_from_config
from merge.recipe import load_merge_config


def is_hydra_form(argv: List[str]) -> bool:
    overrides = without_cli_flags(argv)
    return bool(overrides) and all("=" in a and not a.startswith("-") for a in overrides)


def merge_arguments(argv: List[str], doc: str) -> Tuple[dict, str, MergeOptions]:
    """The recipe, output directory and options of launch/merge.py's arguments; --help (and, in
    the Hydra form, --cfg) print and exit 0."""
    if is_hydra_form(argv):
        cfg = MERGE_COMMAND.config(argv, doc)
        return recipe_from_config(cfg), cfg.output_dir, options_from(cfg)
    args = file_form_parser(doc).parse_args(argv)
    return load_merge_config(args.config), args.out_dir, options_from(args)


def file_form_parser(doc: str = ""):
    """The parser of mergekit-yaml's form, CONFIG.yml OUT_DIR [flags]; its --help lists every method."""
    parser = argument_parser("python launch/merge.py CONFIG.yml OUT_DIR [--workers W] [--verify]",
                             prog="launch/merge.py", description=doc,
                             epilog=methods.cli_help() + "\n\n" + MERGE_COMMAND.groups_help())
    parser.add_argument("config", help="mergekit YAML")
    parser.add_argument("out_dir", help="output model directory")
    add_merge_options(parser)
    return parser
