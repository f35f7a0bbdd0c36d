"""The reliability pieces on their own: value checks in the schemas, row checks, the output lock,
secret redaction, the shared safetensors header check, and which model directory a preset
with a GGUF file resolves to once a trained stage is given."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support.env import REPO
from omegaconf import OmegaConf

from core.errors import UserError, exit_on_user_error
from core.lock import OutputLock
from core.safetensors_header import read_model_headers
from core.secrets import redact
from core.validate import at_least, checked, validate_config, validate_dataclass
from train.config import TrainingConfig, compose_train_config
from train.data.sources import ROW_SCHEMAS, check_rows


# ---------------------------------------------------------------------------------------------
# value checks
# ---------------------------------------------------------------------------------------------
def test_omegaconf_does_not_run_post_init_so_the_walker_does():
    """Why core.validate walks the composed tree: a structured config merged with an override
    never calls the dataclass's __post_init__."""
    calls = []

    @dataclasses.dataclass
    class Probe:
        x: int = checked(1, at_least(1))

        def __post_init__(self):
            calls.append(self.x)

    cfg = OmegaConf.merge(OmegaConf.structured(Probe), {"x": -5})
    assert calls == [] and cfg.x == -5
    with pytest.raises(UserError, match=r"^x=-5: must be >= 1$"):
        validate_config(cfg)
    with pytest.raises(UserError, match=r"^x=0: must be >= 1$"):
        validate_dataclass(Probe(x=0))


def test_every_numeric_training_field_declares_its_domain():
    numeric = [f for f in dataclasses.fields(TrainingConfig) if f.type in ("int", "float", "Optional[int]")]
    unchecked = [f.name for f in numeric if not f.metadata.get("check")]
    assert len(numeric) >= 10 and not unchecked, unchecked


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def test_check_rows_names_the_source_row_and_field():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": ["b"]}]
    with pytest.raises(UserError) as err:
        check_rows(rows, ROW_SCHEMAS["preference"], "data.preference.path=x.jsonl")
    assert str(err.value).startswith("data.preference.path=x.jsonl: row 1, field 'rejected' turn 0 is b")
    assert check_rows(rows[:1] * 500, ROW_SCHEMAS["preference"], "s") == 200  # only the first rows are read
    ok = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}]
    assert check_rows(ok, ROW_SCHEMAS["sft"], "s") == 1
    with pytest.raises(UserError, match="row 0, field 'score' is a str"):
        from train.data.sources import number_value

        check_rows([{"score": "high"}], {"score": number_value}, "s")


# ---------------------------------------------------------------------------------------------
# the output lock
# ---------------------------------------------------------------------------------------------
def test_lock_is_exclusive_names_its_holder_and_is_taken_over_when_stale(tmp_path, capsys):
    out = tmp_path / "run"
    with OutputLock(out, "output_dir") as held:
        assert held.path == tmp_path / ".run.lock"
        # another process: flock excludes other open file descriptions, in any process
        code = ("import sys; from core.lock import OutputLock\n"
                "OutputLock(sys.argv[1], 'output_dir').acquire()")
        proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode != 0 and "is being written by another run (pid" in proc.stderr
    assert not held.path.exists()
    held.path.write_text("pid 999999 on host elsewhere\n")  # left by a killed run
    with OutputLock(out, "output_dir"):
        assert "taking over a stale lock (pid 999999 on host elsewhere" in capsys.readouterr().err
    assert not out.exists()  # the lock never creates the output itself


# ---------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------
def test_redact_masks_secret_environment_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEfakeFAKEfake123")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws/secret/value/123")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "no-not-a-secret")
    text = ("token: hf_FAKEfakeFAKEfake123\nkey=0123456789abcdef0123456789abcdef01234567 aws/secret/value/123 "
            "no-not-a-secret\n")
    assert redact(text) == "token: <redacted>\nkey=<redacted> <redacted> no-not-a-secret\n"


# ---------------------------------------------------------------------------------------------
# model directories
# ---------------------------------------------------------------------------------------------
def write_shard(path: Path, declared: int = 64, actual: int = 64) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [declared // 4], "data_offsets": [0, declared]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * actual)
    return path


def test_header_check_names_the_damaged_shard_and_the_index(tmp_path):
    write_shard(tmp_path / "model-00001.safetensors")
    write_shard(tmp_path / "model-00002.safetensors", actual=10)
    with pytest.raises(UserError, match=r"model-00002.safetensors: tensor 'w' ends at byte .* truncated"):
        read_model_headers(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w": "model-00001.safetensors", "x": "model-00003.safetensors"}}))
    with pytest.raises(UserError, match="lists shard 'model-00003.safetensors', which is missing"):
        read_model_headers(tmp_path)


def test_a_trained_model_path_wins_over_the_presets_gguf_file(tmp_path):
    """Continuing from a trained SmolLM2 stage: model.path=<stage output> alone is enough."""
    from train.model import resolve_model_dir

    trained = tmp_path / "sft"
    trained.mkdir()
    (trained / "config.json").write_text("{}")
    write_shard(trained / "model.safetensors")
    cfg = compose_train_config(["+stage=dpo", "model=smollm2_135m", f"model.path={trained}",
                                f"output_dir={tmp_path}/dpo"]).model
    assert cfg.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model_dir(cfg) == trained
    # a directory that holds no finished model still means "the GGUF file in it"
    (tmp_path / "pkg").mkdir()
    cfg.path = str(tmp_path / "pkg")
    with pytest.raises(UserError, match="model.gguf_file: .*SmolLM2-135M-Instruct.Q4_1.gguf not found"):
        resolve_model_dir(cfg)


# A user error on a rank other than 0, as a multi-rank launcher runs it (cwd=REPO).
FAIL_ON_RANK = """
import sys
import signal
import core.errors as errors
errors.RANK_ERROR_GRACE_S = float(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: None)  # as training's preemption handler: SIGTERM = "stop later"
print("failing", flush=True)
def main():
    raise errors.UserError("training.lerning_rate: unknown key")
errors.exit_on_user_error(main)
"""


def rank_process(rank: str, grace: float) -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "RANK": rank, "WORLD_SIZE": "2"}
    return subprocess.Popen([sys.executable, "-c", FAIL_ON_RANK, str(grace)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_rank_that_fails_alone_reports_after_the_grace():
    proc = rank_process("1", 0.5)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == "error: (rank 1) training.lerning_rate: unknown key"


def test_a_rank_left_waiting_by_one_that_ended_stops_without_a_traceback(monkeypatch, capsys):
    """Rank 0 ends on a full disk while rank 1 waits in DeepSpeed's checkpoint barrier: gloo
    tells rank 1 its peer is gone; rank 0's error line stays the only one."""
    def waiting_in_a_barrier():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1941")

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(waiting_in_a_barrier)
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == "rank 1 stopped: another rank ended first"
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, a lost connection is the error itself
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        exit_on_user_error(waiting_in_a_barrier)


def test_a_rank_ended_by_the_launcher_during_the_grace_prints_nothing():
    # deepspeed's launcher polls every second and SIGTERMs every rank once one exits non-zero:
    # a rank that failed first must not take rank 0's line with it, nor add its own.
    proc = rank_process("1", 30)
    assert proc.stdout.readline().strip() == "failing"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == -15 and "error:" not in err, (proc.returncode, err)


# Two real gloo ranks (cwd=REPO): rank 1 busy past the process group's timeout, rank 0 waiting for
# it at a barrier, as the other ranks wait while rank 0 prepares the data or writes the final model.
WAIT_AT_A_BARRIER = """
import datetime, sys, time
import torch.distributed as dist
import core.errors as errors
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=2))
if rank == 1:
    time.sleep(20)
else:
    errors.exit_on_user_error(dist.barrier)
"""


def test_a_barrier_that_times_out_is_one_line_naming_the_timeout_key():
    from tests.support.env import free_port

    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", WAIT_AT_A_BARRIER, str(rank), port], cwd=REPO,
                              env={"PATH": "/usr/bin:/bin", "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    try:
        _, err = ranks[1].communicate(timeout=120)
    finally:
        ranks[0].kill()
        ranks[0].communicate()
    assert ranks[1].returncode == 2, err
    assert "Traceback" not in err, err
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    assert line.startswith("error: this rank waited 2 s for the other ranks at a barrier or collective and gave up "
                           "(training.ddp_timeout=2): "), line
    assert "raise training.ddp_timeout=<seconds>" in line


def test_the_distributed_timeout_is_a_training_key_that_reaches_the_trainer():
    from train.config import DDP_TIMEOUT_S
    from train.run import common_trainer_kwargs
    from train.runtime import Runtime

    cpu = Runtime(device="cpu", backend="gloo", precision="fp32", rank=0, local_rank=0, world_size=2)
    default = compose_train_config(["+stage=cpt"])
    assert default.training.ddp_timeout == DDP_TIMEOUT_S == 3 * 3600  # transformers' own: 1800
    assert common_trainer_kwargs(default, cpu)["ddp_timeout"] == DDP_TIMEOUT_S
    assert common_trainer_kwargs(compose_train_config(["+stage=cpt", "training.ddp_timeout=60"]), cpu)["ddp_timeout"] == 60
