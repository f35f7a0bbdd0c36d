"""Evaluate one model directory with lm-evaluation-harness: see docs/eval.md.

    python launch/eval.py outputs/sft-tiny                              # bundled eval sets, both protocols
    python launch/eval.py outputs/sft-tiny tasks=[materials_cpt_mc_gen,general_mc_loglik] limit=50
    python launch/eval.py outputs/sft-tiny eval_sets=[my_mc.jsonl]      # a paper-format file, both protocols
    python launch/eval.py outputs/sft-tiny tasks=[my_task] include_path=[my_tasks/]
    python launch/eval.py eval=smollm2_gguf                             # SmolLM2-135M-Instruct from its GGUF

Hydra form (conf/eval_job.yaml + conf/eval/<preset>.yaml):

    python launch/eval.py model_dir=outputs/sft-tiny eval=domain batch_size=32 dtype=bfloat16 device=cuda
    torchrun --standalone --nproc_per_node 8 launch/eval.py /models/merged eval=bundled   # a copy per GPU
    python launch/eval.py /models/llama-70b parallelize=true      # one process, the model split over the GPUs
    python launch/eval.py /models/merged backend=vllm tensor_parallel=2 data_parallel=4

Writes <MODEL_DIR>/eval/<task>.json (atomically) and prints task, protocol, metric, value ±
stderr, 95% interval and n.
"""

import sys
from pathlib import Path

# Put the repo root first, so the checkout's own packages are the ones imported.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import exit_on_user_error  # noqa: E402


def main(argv):
    from evaluation.config import EVAL_COMMAND, eval_overrides

    cfg = EVAL_COMMAND.config(eval_overrides(argv), __doc__)  # --help, --cfg and mistakes end here
    from evaluation.run import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
