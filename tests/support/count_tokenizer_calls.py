"""launch/train.py with every tokenizer call recorded: one line (the number of texts) per call
in $TOKENIZER_CALLS_DIR/rank-<RANK>. Run it as launch/train.py is run:

    deepspeed --num_gpus 2 tests/support/count_tokenizer_calls.py +stage=cpt ...
"""

import os
import runpy
import sys
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[2]

tokenize = PreTrainedTokenizerBase.__call__


def counting_call(self, text=None, *args, **kwargs):
    calls = Path(os.environ["TOKENIZER_CALLS_DIR"]) / f"rank-{os.environ.get('RANK', '0')}"
    with open(calls, "a") as f:
        f.write(f"{len(text) if isinstance(text, list) else 1}\n")
    return tokenize(self, text, *args, **kwargs)


PreTrainedTokenizerBase.__call__ = counting_call  # the class, so the datasets fingerprint of the tokenizer is unchanged
sys.argv[0] = str(REPO / "launch" / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
