"""Preview what a stage trains on, or estimate its memory per GPU, before spending GPUs.

    python launch/preview.py +stage=sft
    python launch/preview.py +stage=cpt data=paper_mix --samples 2
    python launch/preview.py +stage=dpo data.preference.path=my_pairs.jsonl --samples 5
    python launch/preview.py +stage=cpt model=llama3_1_8b model.path=/models/Llama-3.1-8B-Instruct --memory --gpus 8 --gpu-memory 80

Takes launch/train.py's config (any key=value override) and shows the first prepared rows with
their loss masks and token counts, plus the dataset stats (CPT blocks, packing efficiency, a mix's
tokens per source). Only the tokenizer loads; it runs on the CPU in one process. --memory reads
config.json only. See train/preview.py and train/memory.py.
"""

import sys
from pathlib import Path

# Put the repo root first: this file's own folder would otherwise shadow the `train` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import exit_on_user_error  # noqa: E402


def main(argv):
    from train.preview import preview

    sys.stdout.write(preview(argv, __doc__))


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
