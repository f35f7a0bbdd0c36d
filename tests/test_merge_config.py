"""Every conf/merge preset composes onto its schema and yields a valid mergekit-style recipe."""

import subprocess
import sys

import pytest

from core.errors import UserError
from merge.config import compose_merge_config, options_from, recipe_from_config
from merge.recipe import check_recipe
from merge.shards import parse_size
from core.config import CONF_DIR
from tests.support.env import REPO, offline_env

PRESETS = sorted(p.stem for p in (CONF_DIR / "merge").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_merge_preset_composes_to_a_valid_recipe(preset):
    cfg = compose_merge_config([f"merge={preset}", "merge.model=/m/ft", "merge.base_model=/m/instruct",
                                "output_dir=/o", "workers=2", "shard_size=500MB"])
    recipe = recipe_from_config(cfg)
    spec = check_recipe(recipe)
    assert {s.model for s in spec.slices[0].sources} == {"/m/ft", "/m/instruct"}
    assert spec.base_model == "/m/instruct"
    options = options_from(cfg)
    assert options.workers == 2 and parse_size(options.shard_size) == 500 * 10**6


def test_paper_preset_is_the_papers_gradient():
    recipe = recipe_from_config(compose_merge_config(
        ["merge=paper_slerp", "merge.model=a", "merge.base_model=b", "output_dir=o"]))
    assert recipe["parameters"]["t"] == [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    assert recipe["merge_method"] == "slerp" and recipe["dtype"] == "bfloat16"


def test_typo_names_the_key_and_the_merge_schema():
    with pytest.raises(UserError, match=r"'merge\.dtpye'.*merge/config\.py"):
        compose_merge_config(["merge.dtpye=float32", "merge.model=a", "merge.base_model=b", "output_dir=o"])


# The file form plans a merge without Hydra: the interpreter imports nothing from hydra or omegaconf.
FILE_FORM_IMPORTS = """
import sys
from merge.cli import merge_arguments
import merge.run
recipe, out, options = merge_arguments([sys.argv[1], sys.argv[2], "--workers", "2"], "")
assert recipe["merge_method"] == "nuslerp" and options.workers == 2, (recipe, options)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf")))
"""


def test_the_file_form_imports_neither_hydra_nor_omegaconf(tmp_path):
    recipe = tmp_path / "nuslerp.yml"
    recipe.write_text("merge_method: nuslerp\nbase_model: /m/base\ndtype: bfloat16\n"
                      "models: [{model: /m/a, parameters: {weight: 0.5}}, {model: /m/b, parameters: {weight: 0.5}}]\n")
    proc = subprocess.run([sys.executable, "-c", FILE_FORM_IMPORTS, str(recipe), str(tmp_path / "out")],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
