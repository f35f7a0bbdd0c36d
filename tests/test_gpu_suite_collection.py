"""tests/gpu/ is collected only when asked for, and then it imports and lists every GPU test, so
that the suite cannot rot on CPU-only machines."""

from __future__ import annotations

import pytest

from tests.support.env import REPO
from tests.support.gpu import gpu_suite_requested

GPU_TESTS = {
    *{f"test_stage_trains_in_bf16_and_the_model_generates[{stage}-{finetune}]"
       for finetune in ("full", "lora", "qlora") for stage in ("cpt", "sft", "dpo", "orpo")},
    *{f"test_qlora_merged_model_is_the_dequantized_base_plus_the_adapter_delta[{stage}-qlora]"
       for stage in ("cpt", "sft", "dpo", "orpo")},
    "test_automatic_precision_takes_bf16_where_native_and_nccl",
    "test_fp16_trains_with_a_loss_scale_that_settles",
    "test_qlora_in_fp16_starts_from_the_same_base_as_in_bf16",
    "test_flash_attn_preflight_matches_this_gpu",
    *{f"test_killed_run_resumes_from_its_checkpoint_and_finishes[{case}]"
       for case in ("same-gpus", "fewer-gpus", "more-gpus")},
    "test_merge_of_two_outputs_generates",
    "test_evaluation_writes_metrics",
    "test_known_answers_score_exactly_on_the_gpu",
    "test_data_parallel_evaluation_matches_one_process",
    "test_tiny_pipeline",
    "test_fused_adamw_steps_on_after_the_repair_as_if_never_interrupted",
}


@pytest.mark.parametrize("args, markexpr, asked", [
    (["tests"], "", False),
    ([], "not integration and not slurm", False),
    (["tests"], "not gpu", False),
    (["tests/gpu"], "gpu", True),
    (["tests"], "gpu", True),
    ([], "(gpu and not slow)", True),
    (["tests/gpu/test_gpu_suite.py::test_tiny_pipeline"], "", True),
])
def test_the_gpu_suite_is_collected_only_when_asked_for(args, markexpr, asked):
    """CI's `python -m pytest` (no GPU, 0 skipped) must not even collect tests/gpu."""
    assert gpu_suite_requested(args, markexpr, REPO) is asked


def test_the_gpu_suite_collects_its_tests():
    """`python -m pytest tests/gpu -m gpu` imports and lists the whole GPU suite, so it cannot rot
    where there is no GPU to run it."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/gpu", "-m", "gpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = {line.split("::", 1)[1] for line in proc.stdout.splitlines() if line.startswith("tests/gpu/")}
    assert ids == GPU_TESTS, sorted(ids ^ GPU_TESTS)
