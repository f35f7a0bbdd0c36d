"""Build the `tiny` model's tokenizer: a 2048-token byte-level BPE trained on the bundled
materials corpus, with ChatML special tokens and chat template (the SmolLM2 convention).

    python train/assets/build_tiny_tokenizer.py      # rewrites train/assets/tiny_tokenizer/

The result is committed, so runs never depend on this script.
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "tiny_tokenizer"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# ChatML; {% generation %} marks assistant tokens so assistant-only masks can be derived.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus_lines():
    for path in sorted((ROOT / "data" / "materials").glob("*.jsonl")):
        for line in path.open():
            row = json.loads(line)
            for value in row.values():
                if isinstance(value, str):
                    yield value
                elif isinstance(value, list):
                    for item in value:
                        if isinstance(item, dict) and isinstance(item.get("content"), str):
                            yield item["content"]


def main() -> None:
    lines = list(corpus_lines())
    if not lines:
        sys.exit("error: no corpus under data/materials/: run python -m data.make_materials first")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        unk_token=None,
        pad_token="<|pad|>",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} (vocab {tok.get_vocab_size()}) from {len(lines)} texts")


if __name__ == "__main__":
    main()
