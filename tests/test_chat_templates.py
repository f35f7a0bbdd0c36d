"""Chat templates without a system role (Gemma 2's raises on one): SFT, preference pairs and
rewrite prompts fold a leading system turn into the first user turn, the folded text gets no
loss, and templates that take a system turn render exactly as before. Tiny tokenizer, CPU."""

from __future__ import annotations

import datasets
import pytest
from transformers import AutoTokenizer

from tests.support.models import TOKENIZER
from train.augment.generation import render_prompt
from train.config import DatasetConfig, compose_train_config
from train.data import IGNORE_INDEX
from train.data.chat import SYSTEM_PROBE, accepts_system_turn, fold_system_turn
from train.data.preference import tokenize_preference_rows
from train.data.sft import prepare_sft, tokenize_chat
from train.data.sources import load_rows

# Gemma-2-9b-it's template, less its bos_token: no system role, roles must alternate, the
# assistant speaks as "model".
GEMMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# The same with transformers' {% generation %} markers around the assistant content.
GEMMA2_TAGGED_TEMPLATE = GEMMA2_TEMPLATE.replace(
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}",
    "{{ '<start_of_turn>' + role + '\n' }}{% if role == 'model' %}{% generation %}"
    "{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<end_of_turn>' }}{% endif %}{{ '\n' }}",
)
SYSTEM = "You are a materials science assistant."
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the density of iron?"},
    {"role": "assistant", "content": "The density of iron is 7.874 g/cm3."},
    {"role": "user", "content": "And its structure?"},
    {"role": "assistant", "content": "Iron is body-centred cubic (bcc)."},
]
PAIR = {"prompt": CHAT[:2], "chosen": [{"role": "assistant", "content": "7.87 g/cm3."}],
        "rejected": [{"role": "assistant", "content": "2.70 g/cm3."}]}


def tokenizer_with(template=None):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module", params=[GEMMA2_TEMPLATE, GEMMA2_TAGGED_TEMPLATE], ids=["gemma2", "gemma2+tags"])
def gemma(request):
    return tokenizer_with(request.param)


@pytest.fixture(scope="module")
def tiny():
    return tokenizer_with()


def trained_text(tokenizer, labels) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_the_probe_tells_the_templates_apart(gemma, tiny):
    assert not accepts_system_turn(gemma)
    assert accepts_system_turn(tiny)


def test_the_probe_renders_once_per_template():
    tok = tokenizer_with(GEMMA2_TEMPLATE + "{# probed once #}")
    render, probes = tok.apply_chat_template, []
    tok.apply_chat_template = lambda messages, **kw: (probes.append(messages == SYSTEM_PROBE), render(messages, **kw))[1]
    for _ in range(3):
        tokenize_chat(tok, CHAT, assistant_only=True)
    assert sum(probes) == 1


def test_system_text_joins_the_first_user_turn_and_gets_no_loss(gemma):
    ids, labels = tokenize_chat(gemma, CHAT, assistant_only=True)
    assert gemma.decode(ids).startswith(f"<start_of_turn>user\n{SYSTEM}\n\nWhat is the density of iron?<end_of_turn>\n")
    trained = trained_text(gemma, labels)
    assert SYSTEM not in trained and "density of iron?" not in trained
    for answer in ("The density of iron is 7.874 g/cm3.<end_of_turn>", "Iron is body-centred cubic (bcc).<end_of_turn>"):
        assert answer in trained


@pytest.fixture
def no_map_cache():
    """datasets' map cache is keyed by the mapped function, not what it calls: a result cached
    before a change to the rendering would hide it."""
    datasets.disable_caching()
    yield
    datasets.enable_caching()


def test_sft_prepares_the_bundled_chats_that_open_with_a_system_turn(gemma, no_map_cache):
    cfg = compose_train_config(["+stage=sft", "data.sft.max_samples=8"])
    first = load_rows(DatasetConfig(path=cfg.data.sft.path, max_samples=1), "sft")[0]["messages"][0]
    assert first["role"] == "system"
    data = prepare_sft(cfg, gemma)
    assert data.stats["num_examples"] == 8 and data.stats["loss_tokens"] > 0
    for row in data.train_dataset:
        assert first["content"] in gemma.decode(row["input_ids"])
        assert first["content"] not in trained_text(gemma, row["labels"])


def test_preference_pairs_with_a_system_prompt_tokenize(gemma):
    data, _ = tokenize_preference_rows([PAIR], gemma, 64, 128)
    prompt = gemma.decode(data[0]["prompt_ids"])
    assert prompt == f"<start_of_turn>user\n{SYSTEM}\n\nWhat is the density of iron?<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.decode(data[0]["chosen_ids"]).startswith("7.87 g/cm3.<end_of_turn>")


def test_rewrite_prompts_fold_the_system_prompt(gemma):
    assert render_prompt(gemma, "Rewrite this.", SYSTEM) == (
        f"<start_of_turn>user\n{SYSTEM}\n\nRewrite this.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_templates_with_a_system_role_render_as_before(tiny):
    assert fold_system_turn(tiny, CHAT) is CHAT
    ids, labels = tokenize_chat(tiny, CHAT, assistant_only=True)
    assert ids == tiny.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert tiny.decode(ids).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    data, _ = tokenize_preference_rows([PAIR], tiny, 64, 128)
    rendered = tiny.apply_chat_template(PAIR["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)
    assert data[0]["prompt_ids"] == rendered["input_ids"]
    assert render_prompt(tiny, "Rewrite this.", SYSTEM) == tiny.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Rewrite this."}],
        tokenize=False, add_generation_prompt=True)


def test_a_system_turn_without_a_user_turn_after_it_becomes_the_user_turn(gemma):
    chat = [{"role": "system", "content": SYSTEM}, {"role": "assistant", "content": "Ready."}]
    assert fold_system_turn(gemma, chat) == [{"role": "user", "content": SYSTEM}, chat[1]]
