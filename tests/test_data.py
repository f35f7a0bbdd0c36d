"""train/data/: loaders for every format, CPT block packing, SFT assistant-only labels, and the
one-line errors for bad data. Unit tests on the tiny tokenizer and small files (a few seconds)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict, IterableDataset

from core.errors import UserError
from train.config import DatasetConfig, compose_train_config
from tests.support.files import write_jsonl
from tests.support.labels import trained_spans
from train.data import IGNORE_INDEX
from train.data.cpt import prepare_cpt
from train.data.sft import assistant_char_spans, prepare_sft, tokenize_chat
from train.data.sources import load_rows
from train.model import load_tokenizer

DOCS = [
    "Iron has atomic number 26.",
    "Copper is face-centred cubic.",
    "Tungsten has the highest melting point of all metals.",
    "Silicon crystallizes in the diamond structure.",
    "Gold is dense: 19.3 g/cm3.",
]
# SmolLM2-135M-Instruct's chat template, verbatim from its GGUF: ChatML without {% generation %}.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.3's template, shortened (no tools, no bos): the system prompt joins the
# LAST user turn, so prefixes render differently as the chat grows.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}"
    "{%- endif %}{%- endfor %}"
)
CHAT = [
    {"role": "system", "content": "You are a materials science assistant."},
    {"role": "user", "content": "What is the density of iron?"},
    {"role": "assistant", "content": "The density of iron is 7.874 g/cm3."},
    {"role": "user", "content": "And its structure?"},
    {"role": "assistant", "content": "Iron is body-centred cubic (bcc)."},
]


def cfg_for(stage, *overrides):
    return compose_train_config([f"+stage={stage}", *overrides])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(cfg_for("cpt").model)


def with_template(tokenizer, template):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = template
    return tok


@pytest.fixture
def smollm2_tokenizer(tokenizer):
    return with_template(tokenizer, SMOLLM2_TEMPLATE)


def texts(rows):
    return [r["text"] for r in rows]


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
def test_loads_each_file_format(tmp_path):
    rows = [{"text": d} for d in DOCS]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"), index=False)
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv"):
        loaded = load_rows(DatasetConfig(path=str(tmp_path / name)), "cpt")
        assert isinstance(loaded, Dataset)
        assert texts(loaded) == DOCS, name


def test_txt_file_is_one_document_glob_and_directory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):  # multi-paragraph files stay one document each
        (corpus / f"{i:02d}.txt").write_text(f"{doc}\n\nSecond paragraph {i}.\n")
    (corpus / ".checkpoints").mkdir()
    (corpus / ".checkpoints" / "00.txt").write_text("a stale copy, hidden: skipped")
    expected = [f"{doc}\n\nSecond paragraph {i}.\n" for i, doc in enumerate(DOCS)]
    assert texts(load_rows(DatasetConfig(path=str(corpus)), "cpt")) == expected
    assert texts(load_rows(DatasetConfig(path=str(corpus / "0[0-2].txt")), "cpt")) == expected[:3]


def test_saved_hf_dataset_and_split(tmp_path):
    rows = [{"text": d} for d in DOCS]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    DatasetDict(train=Dataset.from_list(rows[:2]), test=Dataset.from_list(rows[2:])).save_to_disk(
        str(tmp_path / "dict")
    )
    assert texts(load_rows(DatasetConfig(path=str(tmp_path / "single")), "cpt")) == DOCS
    assert texts(load_rows(DatasetConfig(path=str(tmp_path / "dict"), split="test"), "cpt")) == DOCS[2:]
    with pytest.raises(UserError, match=r"has splits train, test, not 'validation': set data.cpt.split"):
        load_rows(DatasetConfig(path=str(tmp_path / "dict"), split="validation"), "cpt")


def test_streaming_returns_an_iterable_dataset(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    Dataset.from_list([{"text": d} for d in DOCS]).save_to_disk(str(tmp_path / "saved"))
    for p in (path, tmp_path / "saved"):
        stream = load_rows(DatasetConfig(path=str(p), streaming=True), "cpt")
        assert isinstance(stream, IterableDataset)
        assert texts(stream) == DOCS
    assert texts(load_rows(DatasetConfig(path=str(path), streaming=True, max_samples=2), "cpt")) == DOCS[:2]


def test_bundled_sample_set_loads_for_every_kind():
    data = cfg_for("sft").data
    assert len(load_rows(data.cpt, "cpt")) > 300
    sft = load_rows(data.sft, "sft")
    assert len(sft) > 300 and {m["role"] for m in sft[0]["messages"]} == {"system", "user", "assistant"}
    pref = load_rows(data.preference, "preference")
    assert len(pref) > 300
    assert all(r["chosen"] != r["rejected"] for r in pref)


# ---------------------------------------------------------------------------------------------
# CPT packing
# ---------------------------------------------------------------------------------------------
def test_cpt_blocks_are_full_eos_joined_and_lose_nothing(tmp_path, tokenizer):
    rows = [{"text": d} for d in DOCS]
    path = write_jsonl(tmp_path / "c.jsonl", rows[:2] + [{"text": "  "}] + rows[2:])  # blank docs are dropped
    data = prepare_cpt(cfg_for("cpt", f"data.cpt.path={path}", "training.max_seq_length=16"), tokenizer)
    eos = tokenizer.eos_token_id
    blocks = data.train_dataset
    assert all(len(b["input_ids"]) == 16 and len(b["labels"]) == 16 for b in blocks)

    # The real tokens, in order, are every document followed by EOS.
    stream = [t for doc in DOCS for t in tokenizer(doc)["input_ids"] + [eos]]
    real = [lab for b in blocks for lab in b["labels"] if lab != IGNORE_INDEX]
    assert real == stream
    assert real.count(eos) == len(DOCS)
    # Only the last block is padded; padding is never a label.
    last = blocks[-1]
    n_pad = 16 * len(blocks) - len(stream)
    assert 0 <= n_pad < 16 and last["labels"][16 - n_pad :] == [IGNORE_INDEX] * n_pad
    assert all(IGNORE_INDEX not in b["labels"] for b in blocks.select(range(len(blocks) - 1)))
    assert data.stats["dataset_tokens"] == len(stream) and data.stats["num_documents"] == len(DOCS)
    assert data.stats["num_blocks"] == len(blocks) == -(-len(stream) // 16)
    assert data.stats["packing_efficiency"] == pytest.approx(len(stream) / (16 * len(blocks)))

    batch = data.data_collator([blocks[0], blocks[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)


def test_cpt_streaming_packs_the_same_blocks(tmp_path, tokenizer):
    # many documents, so the stream crosses several tokenization batches
    rows = [{"text": f"{DOCS[i % 5]} Sample {i}."} for i in range(2500)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    common = [f"data.cpt.path={path}", "training.max_seq_length=64"]
    in_memory = prepare_cpt(cfg_for("cpt", *common), tokenizer).train_dataset
    streamed = prepare_cpt(cfg_for("cpt", *common, "data.cpt.streaming=true", "training.max_steps=5"), tokenizer)
    assert isinstance(streamed.train_dataset, IterableDataset)
    assert list(streamed.train_dataset) == in_memory.to_list()


def test_cpt_bundled_corpus_efficiency(tokenizer):
    data = prepare_cpt(cfg_for("cpt", "training.max_seq_length=256"), tokenizer)
    s = data.stats
    assert s["num_documents"] == 483  # data/materials/cpt.jsonl
    assert s["dataset_tokens"] / (s["num_blocks"] * 256) == s["packing_efficiency"] > 0.99


# ---------------------------------------------------------------------------------------------
# SFT rendering and assistant-only labels
# ---------------------------------------------------------------------------------------------
def label_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("template", ["tiny: generation tags", "SmolLM2: prefix renders", "Mistral: markers"])
def test_assistant_only_labels_cover_exactly_the_assistant_turns(template, tokenizer):
    tok = {"tiny": tokenizer, "SmolLM2": with_template(tokenizer, SMOLLM2_TEMPLATE),
           "Mistral": with_template(tokenizer, MISTRAL_TEMPLATE)}[template.split(":")[0]]
    ids, labels = tokenize_chat(tok, CHAT, assistant_only=True)
    assert ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    # Contiguous label runs are exactly "content<|im_end|>" of each assistant turn.
    runs = trained_spans(ids, labels)
    lead = " " if template.startswith("Mistral") else ""  # BPE fuses the template's space into " The"
    assert [tok.decode(r) for r in runs] == [lead + m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]


def test_offset_spans_agree_with_generation_tags_on_the_bundled_set(tokenizer, smollm2_tokenizer):
    """The prefix-rendering path (for templates without tags) gives the very same labels as
    transformers' {% generation %} mask, row for row (same ChatML turns, tiny tokenizer)."""
    tagless = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tagless.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    rows = load_rows(DatasetConfig(path=cfg_for("sft").data.sft.path, max_samples=60), "sft")
    for row in rows:
        assert tokenize_chat(tagless, row["messages"], True) == tokenize_chat(tokenizer, row["messages"], True)


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, MISTRAL_TEMPLATE], ids=["SmolLM2", "Mistral"])
def test_char_spans_end_at_the_end_of_turn_token(template, tokenizer):
    text, spans = assistant_char_spans(with_template(tokenizer, template), CHAT)
    assert [text[s:e] for s, e in spans] == [
        "The density of iron is 7.874 g/cm3.<|im_end|>",
        "Iron is body-centred cubic (bcc).<|im_end|>",
    ]
    if template is MISTRAL_TEMPLATE:  # the system prompt joins the last user turn only, so a
        # chat that ends with the assistant drops it and prefix renders disagree: markers needed
        assert "materials science assistant" not in text


def test_prompt_completion_rows_render_as_user_assistant(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is Fe?", "completion": "Iron."}])
    data = prepare_sft(cfg_for("sft", f"data.sft.path={path}"), tokenizer)
    row = data.train_dataset[0]
    assert tokenizer.decode(row["input_ids"]) == (
        "<|im_start|>user\nWhat is Fe?<|im_end|>\n<|im_start|>assistant\nIron.<|im_end|>\n"
    )
    assert label_text(tokenizer, row["labels"]) == "Iron.<|im_end|>"


def test_full_sequence_loss_when_assistant_only_is_off(tokenizer):
    ids, labels = tokenize_chat(tokenizer, CHAT, assistant_only=False)
    assert labels == ids


def test_sft_truncates_and_drops_rows_without_loss_tokens(tmp_path, tokenizer):
    long_answer = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "word " * 200}]}
    late_answer = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "A."}]}
    short = {"messages": [{"role": "user", "content": "Fe?"}, {"role": "assistant", "content": "Iron."}]}
    path = write_jsonl(tmp_path / "s.jsonl", [long_answer, late_answer, short])
    data = prepare_sft(cfg_for("sft", f"data.sft.path={path}", "training.max_seq_length=48"), tokenizer)
    assert all(len(r["input_ids"]) <= 48 for r in data.train_dataset)
    assert data.stats["truncated_rows"] == 2  # both long rows; the late answer is cut away entirely
    assert data.stats["dropped_rows"] == 1
    assert data.stats["num_examples"] == len(data.train_dataset) == 2
    # Counted in Arrow over the filtered rows only (the dropped row still sits in the table).
    kept = list(data.train_dataset)
    assert data.stats["dataset_tokens"] == sum(len(r["input_ids"]) for r in kept)
    assert data.stats["loss_tokens"] == sum(label != -100 for r in kept for label in r["labels"])


def test_sft_packing_bins_whole_examples(tokenizer):
    cfg = cfg_for("sft", "training.max_seq_length=256", "stage.packing=true", "data.sft.max_samples=40")
    unpacked = prepare_sft(cfg_for("sft", "training.max_seq_length=256", "stage.packing=false", "data.sft.max_samples=40"),
                           tokenizer)
    packed = prepare_sft(cfg, tokenizer)
    rows = packed.train_dataset
    assert all(len(r["input_ids"]) == sum(r["seq_lengths"]) <= 256 for r in rows)
    assert sorted(n for r in rows for n in r["seq_lengths"]) == sorted(len(r["input_ids"]) for r in unpacked.train_dataset)
    assert packed.stats["packing_efficiency"] == pytest.approx(packed.stats["dataset_tokens"] / (256 * len(rows)))
    assert packed.stats["packing_efficiency"] > 0.8
    batch = packed.data_collator([rows[0]])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(rows[0]["seq_lengths"])  # positions restart at every example


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the key/path and the fix
# ---------------------------------------------------------------------------------------------
def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_names_path_and_key(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert error_of(load_rows, DatasetConfig(path=str(missing)), "sft") == (
        f"data.sft.path={missing} does not exist: fix the path or set data.sft.path=<file|glob|dir>"
    )
    assert "matches no files: fix the pattern" in error_of(load_rows, DatasetConfig(path=str(tmp_path / "*.jsonl")), "cpt")


@pytest.mark.parametrize("streaming", [False, True])
def test_wrong_columns_list_what_was_found(tmp_path, streaming):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    for kind, needs in [("cpt", "`text`"), ("sft", "`messages` (chat turns) or `prompt` + `completion`"),
                        ("preference", "`prompt`, `chosen` and `rejected`")]:
        assert error_of(load_rows, DatasetConfig(path=str(path), streaming=streaming), kind) == (
            f"data.{kind}.path={path} has columns [question, answer] but {kind} data needs {needs}: "
            f"rename them with data.{kind}.columns={{<column>: <stage column>}} or point data.{kind}.path at the "
            "right dataset"
        )


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_dataset(tmp_path, streaming, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert error_of(load_rows, DatasetConfig(path=str(empty), streaming=streaming), "cpt") == (
        f"data.cpt.path={empty} is empty (no rows): point it at a dataset with rows"
    )
    Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "saved"))
    assert "is empty (no rows)" in error_of(load_rows, DatasetConfig(path=str(tmp_path / "saved")), "cpt")
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " \n"}, {"text": None}])
    streamed = ["data.cpt.streaming=true", "training.max_steps=2"] if streaming else []
    assert error_of(prepare_cpt, cfg_for("cpt", f"data.cpt.path={blank}", *streamed), tokenizer) == (
        f"data.cpt.path={blank} holds only empty `text`: point it at a corpus with text"
    )


def test_unsupported_and_mixed_formats(tmp_path):
    (tmp_path / "a.xlsx").write_text("x")
    assert error_of(load_rows, DatasetConfig(path=str(tmp_path / "a.xlsx")), "cpt").startswith(
        f"data.cpt.path={tmp_path / 'a.xlsx'}: unsupported format '.xlsx'; use .jsonl, .json, .parquet"
    )
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", [{"text": "x"}])
    (mixed / "b.txt").write_text("y")
    assert "mixes formats (.jsonl, .txt): keep one format per dataset" in error_of(
        load_rows, DatasetConfig(path=str(mixed)), "cpt"
    )
    assert "plain text has no" in error_of(load_rows, DatasetConfig(path=str(mixed / "b.txt")), "sft")


@pytest.mark.parametrize("streaming", [False, True])
def test_malformed_json_is_one_line(tmp_path, streaming):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"\n')
    message = error_of(load_rows, DatasetConfig(path=str(bad), streaming=streaming), "cpt")
    assert message.startswith(f"could not read data.cpt.path={bad}: JSON parse error")


def test_bad_chat_rows_and_streaming_without_max_steps(tmp_path, tokenizer):
    bad = write_jsonl(tmp_path / "b.jsonl", [{"messages": CHAT}, {"messages": [{"role": "user"}]}])
    assert "b.jsonl: row 1, field 'messages' turn 0 is {'role': 'user'}, expected {role, content}" in error_of(
        prepare_sft, cfg_for("sft", f"data.sft.path={bad}"), tokenizer
    )
    no_answer = write_jsonl(tmp_path / "n.jsonl", [{"messages": CHAT[:2]}])
    assert "no row has an assistant turn" in error_of(prepare_sft, cfg_for("sft", f"data.sft.path={no_answer}"), tokenizer)
    assert error_of(prepare_cpt, cfg_for("cpt", "data.cpt.streaming=true"), tokenizer) == (
        "data.cpt.streaming=true needs training.max_steps>0 (a stream has no length): set training.max_steps"
    )
    assert "stage.packing=true needs the whole SFT set in memory" in error_of(
        prepare_sft, cfg_for("sft", "stage.packing=true", "data.sft.streaming=true", "training.max_steps=3"), tokenizer
    )


# ---------------------------------------------------------------------------------------------
# the bundled sample set
# ---------------------------------------------------------------------------------------------
def test_bundled_sample_set_is_what_the_generator_writes(tmp_path, repo):
    """data/materials/ is reproducible: data/make_materials.py rewrites it byte for byte."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "data.make_materials", "--out", str(tmp_path)], cwd=repo, check=True,
                   capture_output=True)
    committed = repo / "data" / "materials"
    names = sorted(p.name for p in committed.glob("*.jsonl"))
    assert names == ["cpt.jsonl", "cpt_renderings.jsonl", "facts_held.jsonl", "facts_taught.jsonl", "preference.jsonl",
                     "preference_chat.jsonl", "sft.jsonl"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
    assert sum((committed / n).stat().st_size for n in names) < 3_000_000


def test_data_processes_default_to_the_tasks_cores_with_enough_rows_each(monkeypatch):
    import os

    from train.data import map_processes

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(24)))  # e.g. SLURM's --cpus-per-task=24
    assert map_processes(100_000, None) == 16  # capped at MAX_DATA_PROCESSES
    assert map_processes(100_000, 4) == 4  # data.num_proc wins
    assert map_processes(5_000, None) == 2  # at least 2,000 rows a process
    assert map_processes(3_999, None) is None and map_processes(483, 8) is None  # in-process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert map_processes(100_000, None) == 2


@pytest.mark.parametrize("stage", ["cpt", "sft", "dpo"])
def test_data_prepared_in_several_processes_is_the_in_process_data(monkeypatch, tokenizer, stage):
    """The bundled data (~450 rows) split over 2 processes (ROWS_PER_PROCESS lowered for the test)
    gives the same training rows, in the same order, as one process."""
    import os

    import train.data
    from train.stages import get_stage

    hooks = get_stage(stage)
    in_process = hooks.prepare_data(cfg_for(stage, "data.num_proc=1"), tokenizer).train_dataset
    monkeypatch.setattr(train.data, "ROWS_PER_PROCESS", 100)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    calls = []
    real_map = Dataset.map
    monkeypatch.setattr(Dataset, "map", lambda self, *a, **k: calls.append(k.get("num_proc")) or real_map(self, *a, **k))
    split = hooks.prepare_data(cfg_for(stage), tokenizer).train_dataset
    assert 2 in calls, calls
    assert split.to_list() == in_process.to_list()
