"""Secrets stay in the environment (or the tools' own login files: `huggingface-cli login`,
`wandb login`); nothing domainforge writes may carry them.

Configs never hold secrets by design (no schema field takes a token). `redact` is the guard on
every text file a run writes that a user could have steered with an override or an
interpolation such as `${oc.env:HF_TOKEN}`: the resolved config saved with the model, rendered
batch scripts, merge cards.
"""

from __future__ import annotations

import os
import re

# Names of variables whose values are credentials (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY ...).
# Whole words of the name, so TOKENIZERS_PARALLELISM is not one.
SECRET_NAME = re.compile(r"(?:^|_)(?:TOKEN|API_KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?|ACCESS_KEY)(?:_|$)", re.IGNORECASE)
MASK = "<redacted>"
_MIN_LENGTH = 8  # shorter values ("1", "true") would mask ordinary text


def secret_values() -> list:
    """The values of the secret-named variables in this process's environment, longest first."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= _MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret value from the environment replaced by <redacted>."""
    for value in secret_values():
        text = text.replace(value, MASK)
    return text
