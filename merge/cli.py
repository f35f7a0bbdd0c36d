"""launch/merge.py's two command lines, turned into (recipe, output directory, options):

    CONFIG.yml OUT_DIR [--workers W] [--verify] ...     mergekit-yaml's form (argparse)
    merge=<preset> merge.model=... output_dir=... [--cfg] the Hydra form (conf/merge_job.yaml)
"""

from __future__ import annotations

from typing import List, Tuple

from core.errors import argument_parser
from merge import methods
from merge.config import MergeOptions, add_merge_options, merge_command, options_from, recipe_from_config
from merge.recipe import load_merge_config


def is_hydra_form(argv: List[str]) -> bool:
    if not any("=" in a for a in argv):
        return False  # the file form, told without importing core.cli (omegaconf, hydra)
    from core.cli import without_cli_flags

    overrides = without_cli_flags(argv)
    return bool(overrides) and all("=" in a and not a.startswith("-") for a in overrides)


def merge_arguments(argv: List[str], doc: str) -> Tuple[dict, str, MergeOptions]:
    """The recipe, output directory and options of launch/merge.py's arguments; --help (and, in
    the Hydra form, --cfg) print and exit 0."""
    if is_hydra_form(argv):
        cfg = merge_command().config(argv, doc)
        return recipe_from_config(cfg), cfg.output_dir, options_from(cfg)
    args = file_form_parser(doc).parse_args(argv)
    return load_merge_config(args.config), args.out_dir, options_from(args)


def file_form_parser(doc: str = ""):
    """The parser of mergekit-yaml's form, CONFIG.yml OUT_DIR [flags]; its --help lists every method."""
    parser = argument_parser("python launch/merge.py CONFIG.yml OUT_DIR [--workers W] [--verify]",
                             prog="launch/merge.py", description=doc)
    # Composed only when --help prints it: the groups come from conf/ through Hydra's modules.
    parser.format_help = lambda: _with_epilog(parser)
    parser.add_argument("config", help="mergekit YAML")
    parser.add_argument("out_dir", help="output model directory")
    add_merge_options(parser)
    return parser


def _with_epilog(parser) -> str:
    parser.epilog = methods.cli_help() + "\n\n" + merge_command().groups_help()
    return type(parser).format_help(parser)
