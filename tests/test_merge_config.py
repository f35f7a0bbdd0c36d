"""Every conf/merge preset composes onto its schema and yields a valid mergekit-style recipe."""

import pytest

from core.errors import UserError
from merge.config import compose_merge_config, options_from, recipe_from_config
from merge.recipe import check_recipe
from merge.shards import parse_size
from core.config import CONF_DIR

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
