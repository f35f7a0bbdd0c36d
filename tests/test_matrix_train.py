"""Every way a user can get `launch/train.py` wrong, as one table: (arguments, exit code, what
the one `error:` line must say). Each case also asserts no traceback and no finished-looking
output. The cases run `train.run.main` in this process (a subprocess pays ~6 s of imports per
case); a few at the end run the real command to prove the exit path.

    python -m pytest -q tests/test_matrix_train.py
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tests.support.env import REPO, SMALL_BATCH, assert_one_line_error, launch, run_main, tmpfs

from core.errors import UserError
from core.outputs import is_model_dir
from train.checkpoint import RUN_CONFIG
from train.config import compose_train_config
from train.run import train


# ---------------------------------------------------------------------------------------------
# files the cases point at
# ---------------------------------------------------------------------------------------------
def train_main(argv):
    """What launch/train.py does: compose, then train."""
    train(compose_train_config(argv))


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_model(path: Path, truncate: bool = False) -> Path:
    """A model directory whose one shard declares more bytes than it holds when `truncate`."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    body = b"\0" * (10 if truncate else 64)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
FILES = {
    "file": lambda d: (d / "a_file").write_text("x") and d / "a_file",
    "notamodel": lambda d: (d / "notamodel").mkdir() or d / "notamodel",
    "truncated": lambda d: fake_model(d / "truncated", truncate=True),
    "finished": lambda d: fake_model(d / "run"),
    "body.jsonl": lambda d: jsonl(d / "body.jsonl", [{"body": "Iron is a metal."}]),
    "qa.jsonl": lambda d: jsonl(d / "qa.jsonl", [{"question": "q", "answer": "a"}]),
    "empty.jsonl": lambda d: jsonl(d / "empty.jsonl", []),
    "num_text.jsonl": lambda d: jsonl(d / "num_text.jsonl", [{"text": "Iron."}, {"text": 42}]),
    "robot.jsonl": lambda d: jsonl(d / "robot.jsonl", [{"messages": CHAT},
                                                        {"messages": [{"role": "robot", "content": "hi"}]}]),
    "flat_chat.jsonl": lambda d: jsonl(d / "flat_chat.jsonl", [{"messages": "q: a"}]),
    "num_pref.jsonl": lambda d: jsonl(d / "num_pref.jsonl", [{"prompt": "p", "chosen": 1, "rejected": "r"}]),
    "same_pref.jsonl": lambda d: jsonl(d / "same_pref.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}]),
    "no_rejected.jsonl": lambda d: jsonl(d / "no_rejected.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                                    {"prompt": "q2", "chosen": "a2"}]),
}

# (id, arguments ({tmp}: the case's directory; {name}: a file from FILES), needles of the line)
CASES = [
    # stage and keys
    ("no-stage", [], ["no stage chosen", "+stage=<name>"]),
    ("unknown-stage", ["+stage=rlhf"], ["unknown stage 'rlhf'", "cpt", "sft"]),
    ("unknown-preset", ["+stage=cpt", "model=gpt5"], ["unknown model 'gpt5'", "tiny"]),
    ("typo-key", ["+stage=cpt", "training.lerning_rate=1e-4"], ["unknown config key 'training.lerning_rate'"]),
    ("stage-key-of-another-stage", ["+stage=cpt", "+stage.beta=0.1"], ["stage.beta", "CPTStageConfig"]),
    ("not-a-number", ["+stage=cpt", "training.learning_rate=abc"], ["training.learning_rate", "'abc'"]),
    # training ranges
    ("lr-negative", ["+stage=cpt", "training.learning_rate=-1"], ["training.learning_rate=-1.0: must be > 0"]),
    ("lr-zero", ["+stage=cpt", "training.learning_rate=0"], ["training.learning_rate=0.0: must be > 0"]),
    ("epochs-zero", ["+stage=cpt", "training.num_train_epochs=0"], ["training.num_train_epochs=0.0: must be > 0"]),
    ("max-steps-zero", ["+stage=cpt", "training.max_steps=0"], ["training.max_steps=0: must be -1 or > 0"]),
    ("batch-zero", ["+stage=cpt", "training.per_device_train_batch_size=0"],
     ["training.per_device_train_batch_size=0: must be >= 1"]),
    ("accumulation-zero", ["+stage=cpt", "training.gradient_accumulation_steps=0"],
     ["training.gradient_accumulation_steps=0: must be >= 1"]),
    ("warmup-negative", ["+stage=cpt", "training.warmup_steps=-1"], ["training.warmup_steps=-1.0: must be >= 0"]),
    ("weight-decay-negative", ["+stage=cpt", "training.weight_decay=-0.1"], ["training.weight_decay=-0.1: must be >= 0"]),
    ("grad-norm-negative", ["+stage=cpt", "training.max_grad_norm=-1"], ["training.max_grad_norm=-1.0: must be >= 0"]),
    ("seq-too-short", ["+stage=cpt", "training.max_seq_length=4"], ["training.max_seq_length=4: must be >= 8"]),
    ("seq-above-model", ["+stage=cpt", "training.max_seq_length=100000"],
     ["training.max_seq_length=100000", "4096"]),
    ("precision", ["+stage=cpt", "training.precision=int8"], ["training.precision=int8: must be one of auto"]),
    ("save-steps-zero", ["+stage=cpt", "training.save_steps=0"], ["training.save_steps=0: must be >= 1"]),
    ("save-limit-zero", ["+stage=cpt", "training.save_total_limit=0"], ["training.save_total_limit=0: must be >= 1"]),
    ("seed-negative", ["+stage=cpt", "training.seed=-1"], ["training.seed=-1: must be >= 0"]),
    ("loader-workers", ["+stage=cpt", "training.dataloader_num_workers=-2"],
     ["training.dataloader_num_workers=-2: must be >= 0"]),
    # other groups
    ("zero-stage", ["+stage=cpt", "deepspeed.zero_stage=4"], ["deepspeed.zero_stage=4: must be one of 0, 1, 2, 3"]),
    ("log-backend", ["+stage=cpt", "logging.backend=tensorboard"], ["logging.backend=tensorboard", "none, wandb"]),
    ("log-mode", ["+stage=cpt", "logging=wandb", "logging.mode=live"], ["logging.mode=live", "offline"]),
    ("log-steps", ["+stage=cpt", "logging.logging_steps=0"], ["logging.logging_steps=0: must be >= 1"]),
    ("max-samples", ["+stage=cpt", "data.cpt.max_samples=0"], ["data.cpt.max_samples=0: must be >= 1"]),
    ("num-proc", ["+stage=cpt", "data.num_proc=0"], ["data.num_proc=0: must be >= 1"]),
    # stages
    ("dpo-beta", ["+stage=dpo", "stage.beta=0"], ["stage.beta=0.0: must be > 0"]),
    ("orpo-beta", ["+stage=orpo", "stage.beta=-1"], ["stage.beta=-1.0: must be > 0"]),
    ("dpo-prompt-length", ["+stage=dpo", "stage.max_prompt_length=0"], ["stage.max_prompt_length=0: must be >= 1"]),
    ("orpo-prompt-above-length", ["+stage=orpo", "stage.max_prompt_length=512", "stage.max_length=256"],
     ["stage.max_prompt_length=512 must be below stage.max_length=256"]),
    ("dpo-loss", ["+stage=dpo", "stage.loss_type=sigmoidd"], ["stage.loss_type='sigmoidd' is not a DPO loss"]),
    # fine-tuning method and Hub upload
    ("qlora-on-cpu", ["+stage=sft", "training.finetune=qlora"], ["training.finetune=qlora needs a GPU"]),
    ("lora-unknown-module", ["+stage=sft", "training.finetune=lora", "lora.target_modules=[q_proj,attn_qkv]"],
     ["lora.target_modules", "attn_qkv", "q_proj"]),
    ("finetune-unknown", ["+stage=sft", "training.finetune=lorax"],
     ["training.finetune=lorax: must be one of full, lora, qlora"]),
    ("lora-dropout", ["+stage=sft", "training.finetune=lora", "lora.dropout=1.0"], ["lora.dropout=1.0: must be in [0, 1)"]),
    ("hub-push-without-repo", ["+stage=sft", "hub.push=true"], ["hub.push=true needs hub.repo_id"]),
    # paths the run writes
    ("output-is-a-file", ["+stage=cpt", "output_dir={file}"], ["output_dir=", "is an existing file"]),
    ("output-under-a-file", ["+stage=cpt", "output_dir={file}/run"], ["output_dir=", "cannot be created",
                                                                       "is a file"]),
    ("output-finished", ["+stage=cpt", "output_dir={finished}"], ["already holds a finished model"]),
    ("wandb-dir-is-a-file", ["+stage=cpt", "logging=wandb", "logging.dir={file}"], ["logging.dir=", "existing file"]),
    # models
    ("model-missing", ["+stage=sft", "model.path={tmp}/nope"], ["model.path=", "does not exist"]),
    ("model-hub-id", ["+stage=sft", "model.path=HuggingFaceTB/SmolLM2-135M"], ["not a local directory", "download"]),
    ("model-not-a-model", ["+stage=sft", "model.path={notamodel}"], ["model.path", "config.json"]),
    ("ref-model-not-a-model", ["+stage=dpo", "stage.ref_model_path={notamodel}"], ["stage.ref_model_path", "config.json"]),
    ("model-truncated-shard", ["+stage=sft", "model.path={truncated}"], ["model.safetensors", "truncated"]),
    ("gguf-missing", ["+stage=cpt", "model.path={notamodel}", "model.gguf_file=x.gguf"],
     ["model.gguf_file", "x.gguf not found"]),
    ("tokenizer-missing", ["+stage=cpt", "model.tokenizer_path={tmp}/tok"], ["model.tokenizer_path=", "does not exist"]),
    ("resume-not-a-checkpoint", ["+stage=cpt", "resume={tmp}"], ["resume=", "not a complete checkpoint"]),
    # data: files, columns, values
    ("data-missing", ["+stage=cpt", "data.cpt.path={tmp}/nope.jsonl"], ["nope.jsonl", "data.cpt.path"]),
    ("data-no-text-column", ["+stage=cpt", "data.cpt.path={body.jsonl}"], ["`text`", "body"]),
    ("data-no-messages", ["+stage=sft", "data.sft.path={qa.jsonl}"], ["messages", "question"]),
    ("data-empty", ["+stage=cpt", "data.cpt.path={empty.jsonl}"], ["empty"]),
    ("data-text-is-a-number", ["+stage=cpt", "data.cpt.path={num_text.jsonl}"],
     ["num_text.jsonl", "row 1, field 'text'", "expected a string"]),
    ("data-unknown-role", ["+stage=sft", "data.sft.path={robot.jsonl}"],
     ["robot.jsonl", "row 1, field 'messages'", "role 'robot'"]),
    ("data-chat-not-a-list", ["+stage=sft", "data.sft.path={flat_chat.jsonl}"],
     ["row 0, field 'messages'", "expected a non-empty list"]),
    ("data-chosen-is-a-number", ["+stage=dpo", "data.preference.path={num_pref.jsonl}"],
     ["num_pref.jsonl", "row 0, field 'chosen'"]),
    ("data-chosen-equals-rejected", ["+stage=orpo", "data.preference.path={same_pref.jsonl}"],
     ["chosen equals rejected"]),
    ("data-row-without-rejected", ["+stage=dpo", "data.preference.path={no_rejected.jsonl}"],
     ["no_rejected.jsonl", "row 1 has no 'rejected'"]),
    ("data-stream-without-max-steps", ["+stage=cpt", "data.cpt.streaming=true"], ["needs training.max_steps>0"]),
    # schedules: refused at composition (max_steps), or once the data is prepared, before the model loads
    ("warmup-outlasts-max-steps", ["+stage=orpo", "training.warmup_steps=100", "training.max_steps=50"],
     ["training.warmup_steps=100: 100 optimizer step(s)", "50 optimizer step(s): training.max_steps=50"]),
    ("paper-8b-batch-on-the-demo-data", ["+stage=sft", "training.per_device_train_batch_size=6",
                                         "training.global_batch_size=96", "training.max_seq_length=3076"],
     ["training.warmup_steps=0.1: 1 optimizer step(s)", "(1 optimizer step(s): ", "training.per_device_train_batch_size=6 "
      "x 16 accumulation x 1 rank(s)) x training.num_train_epochs=1", "learning rate 0"]),
]


def materialize(args, tmp: Path):
    names = {"tmp": str(tmp)}
    for name, make in FILES.items():
        if "{" + name + "}" in " ".join(args):
            names[name] = str(make(tmp))
    for name, value in names.items():
        args = [a.replace("{" + name + "}", value) for a in args]
    return args


@pytest.mark.parametrize("case, args, needles", CASES, ids=[c[0] for c in CASES])
def test_train_rejects(case, args, needles, tmp_path, capsys):
    argv = materialize(args, tmp_path)
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={tmp_path}/run")
    out = Path(next(a for a in argv if a.startswith("output_dir="))[len("output_dir="):])
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_main(train_main, argv, capsys)
    assert proc.returncode == 2
    assert_one_line_error(proc, *needles)
    if case != "output-finished":
        assert not out.exists() or out.is_file(), "a failed run created its output directory"
    else:
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a failed run left files (a lock?) behind"


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only filesystem (root ignores permission bits, not a read-only mount)."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        yield mnt


def test_train_rejects_an_output_on_a_read_only_filesystem(read_only_dir, capsys):
    proc = run_main(train_main, ["+stage=cpt", f"output_dir={read_only_dir}/run"], capsys)
    assert_one_line_error(proc, f"output_dir={read_only_dir}/run: cannot be created", "read-only")


# ---------------------------------------------------------------------------------------------
# the resolved config, from the start of a run
# ---------------------------------------------------------------------------------------------
def test_the_resolved_config_is_written_when_training_starts(tmp_path, capsys, monkeypatch):
    """A run past its setup checks holds <output_dir>/domainforge.yaml, with the values it trains
    with, before any step; the directory does not look finished. The model load, the first thing
    after the start, fails here (a stand-in), so nothing trains."""
    def model_fails_to_load(*args, **kwargs):
        raise UserError("stand-in: the model failed to load")

    monkeypatch.setattr("train.run.load_model", model_fails_to_load)
    out = tmp_path / "run"
    argv = ["+stage=cpt", "training.learning_rate=3e-4", "data.cpt.max_samples=4", *SMALL_BATCH, f"output_dir={out}"]
    assert_one_line_error(run_main(train_main, argv, capsys), "stand-in")
    saved = OmegaConf.load(out / RUN_CONFIG)
    assert saved.training.learning_rate == 3e-4 and saved.output_dir == str(out)
    assert not is_model_dir(out) and sorted(p.name for p in out.iterdir()) == [RUN_CONFIG]


# ---------------------------------------------------------------------------------------------
# two writers
# ---------------------------------------------------------------------------------------------
HOLD_LOCK = (
    "import sys, time; from core.lock import OutputLock\n"  # run with cwd=REPO
    "lock = OutputLock(sys.argv[1], 'output_dir').acquire(); print('held', flush=True); time.sleep(60)\n"
)


def test_second_run_on_a_locked_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_main(train_main, ["+stage=cpt", f"output_dir={out}"], capsys)
        line = assert_one_line_error(proc, f"output_dir={out} is being written by another run",
                                     f"pid {holder.pid} on host")
        assert "choose another output_dir" in line
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking (SIGKILL): its lock file is stale and is taken over.
    assert (tmp_path / ".run.lock").read_text().startswith(f"pid {holder.pid}")
    proc = run_main(train_main, ["+stage=cpt", f"output_dir={out}", "training.max_seq_length=100000"], capsys)
    assert_one_line_error(proc, "training.max_seq_length=100000")  # got past the lock to the next check
    assert f"taking over a stale lock (pid {holder.pid}" in proc.stderr
    assert not (tmp_path / ".run.lock").exists()  # released on the way out


# ---------------------------------------------------------------------------------------------
# the real command: the exit path, and the deepspeed launcher's extra argument
# ---------------------------------------------------------------------------------------------
def test_real_command_prints_one_line_and_exits_2(tmp_path):
    start = time.perf_counter()
    proc = launch("train.py", ["+stage=cpt", "training.learning_rate=-1", f"output_dir={tmp_path}/run"])
    assert proc.returncode == 2
    assert_one_line_error(proc, "training.learning_rate=-1.0: must be > 0")
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - start < 30


@pytest.mark.integration
def test_one_line_under_the_deepspeed_launcher(tmp_path):
    # Both ranks fail the same way; the user sees the error once.
    proc = launch("train.py", ["+stage=cpt", "training.lerning_rate=1e-4", f"output_dir={tmp_path}/run"], ranks=2)
    assert_one_line_error(proc, "training.lerning_rate")
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_locked_output_dir_under_the_deepspeed_launcher(tmp_path):
    """Only rank 0 takes the lock; when it is refused, rank 0 exits 2 and the launcher ends
    the other rank: one line, no traceback, the holder's directory untouched."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = launch("train.py", ["+stage=cpt", f"output_dir={out}"], ranks=2, timeout=300)
        assert_one_line_error(proc, "is being written by another run", f"pid {holder.pid}")
        assert not (out / "config.json").exists() and not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
