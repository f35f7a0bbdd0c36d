"""Run lm-evaluation-harness tasks on one model directory and publish one result file per task.

Order, so that a mistake fails before a model is loaded: check the model directory, decide
where the model goes (evaluation/parallel.py: launched one process per GPU, the ranks a
one-process layout does not need stop here), write the task YAMLs for any paper-format
eval set files, index the task folders (lm-eval's ~14k built-in tasks only when a name is not
found among ours: indexing them costs ~8 s), build every task (this reads and checks its data),
load the model once, evaluate every task in one `simple_evaluate` call (each process scores a
share when there are several), then on rank 0 write `<output_dir>/<task>.json` atomically and
print the table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from core.errors import UserError
from core.model_card import refresh_model_card
from core.outputs import EVAL_DIR, is_model_dir, write_atomic
from core.precision import auto_torch_dtype_name
from core.safetensors_header import read_model_headers
from core.wandb_runs import log_wandb_run
from evaluation.eval_set import TASK_DIR, eval_set_task_yamls
from evaluation.items import item_lines, items_path
from evaluation.parallel import Launched, Layout, bounded_max_length, leave_single_process, plan_layout, weight_bytes
from evaluation.results import format_table, metric_values

LIBRARIES = ("lm_eval", "transformers", "torch", "datasets", "accelerate", "vllm")


def check_model_dir(cfg: DictConfig) -> Tuple[Path, Optional[int]]:
    """(the model directory, its parameter count from the safetensors headers; None for a GGUF file
    or weights in another format)."""
    model_dir = Path(cfg.model_dir).expanduser()
    gguf = cfg.model_args.get("gguf_file")
    if gguf:
        if not (model_dir / gguf).is_file():
            raise UserError(f"model_args.gguf_file: {model_dir / gguf} not found: fix model_dir or the file name")
        return model_dir.resolve(), None
    if not is_model_dir(model_dir):
        raise UserError(f"model_dir {model_dir} is not a model directory (no config.json): give a saved model's "
                        "directory, or the folder of a GGUF file with model_args.gguf_file=NAME")
    # A damaged shard: one line naming it, before lm-eval loads anything.
    headers = read_model_headers(model_dir)
    parameters = sum(t.numel for h in headers.values() for t in h.tensors.values()) or None
    return model_dir.resolve(), parameters


def eval_set_tasks(eval_sets: List[str]) -> Dict[str, str]:
    """{task name: task YAML} (both protocols) for each paper-format file, each file checked."""
    tasks: Dict[str, str] = {}
    for path in eval_sets:
        stem = Path(path).name.split(".")[0]
        for task, text in eval_set_task_yamls(path, stem).items():
            if task in tasks:
                raise UserError(f"eval_sets: two files named {stem}: rename one (task names come from file names)")
            tasks[task] = text
    return tasks


def write_eval_set_tasks(eval_sets: List[str], folder: Path) -> List[str]:
    """Task YAMLs (both protocols) for each paper-format file, in `folder`; their task names."""
    tasks = eval_set_tasks(eval_sets)
    for task, text in tasks.items():
        (folder / f"{task}.yaml").write_text(text)
    return list(tasks)


def unreadable_yamls(folders: List[Path]) -> List[str]:
    """'file: reason' for each task YAML in `folders` that lm-eval cannot parse (its indexer
    skips them silently, so a broken file would otherwise look like an unknown task)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    found = []
    for folder in folders:
        for path in sorted(folder.glob("**/*.yaml")):
            try:
                cfg = load_yaml(path, resolve_func=False)
                if "task" not in cfg and "group" not in cfg:
                    raise ValueError("it has neither a 'task' nor a 'group' key")
            except Exception as err:  # noqa: BLE001 - any parse error is reported, not raised
                found.append(f"{path}: {str(err).splitlines()[0]}")
    return found


def task_manager_for(tasks: List[str], include: List[Path], user_folders: List[Path]):
    """lm-eval's TaskManager over our folders, with its built-in tasks only when needed."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False, include_path=[str(p) for p in include])
    if all(t in manager.all_tasks for t in tasks):
        return manager
    manager = TaskManager(include_path=[str(p) for p in include])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        bundled = TaskManager(include_defaults=False, include_path=str(TASK_DIR)).all_tasks
        broken = unreadable_yamls(user_folders)
        note = f"; {len(broken)} task file(s) could not be read, first {broken[0]}" if broken else ""
        raise UserError(f"unknown task '{unknown[0]}': not a bundled task or tag ({', '.join(bundled)}), "
                        f"an lm-eval built-in, or a task in include_path{note}")
    return manager


def check_task_names(cfg: DictConfig) -> None:
    """Every task name is a bundled task or tag, one in include_path, or an lm-eval built-in:
    checked from the task files alone (no model, no torch), e.g. before a pipeline submits jobs."""
    folders = [Path(p).expanduser().resolve() for p in cfg.include_path]
    task_manager_for(list(cfg.tasks), [TASK_DIR, *folders], folders)


def build_tasks(tasks: List[str], manager) -> list:
    """Build every task once, before the model loads: bad fields and bad data fail here, one
    line naming the task. Returns the built tasks and groups, which simple_evaluate takes as
    they are (building them again would read every data set twice)."""
    built: dict = {}  # by name: a task named twice (itself and in a tag) runs once
    for name in tasks:
        try:
            loaded = manager.load([name])
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - lm-eval raises anything from a bad task file
            first = (str(err).strip().splitlines() or [""])[0]
            raise UserError(f"task '{name}' cannot be built ({type(err).__name__}: {first}): "
                            "check its YAML fields against lm-eval's TaskConfig and its data file") from err
        # a group stays one object (it aggregates its subtasks); a task or tag is its tasks
        if name in loaded["groups"]:
            built[name] = loaded["groups"][name]
        else:
            built.update(loaded["tasks"])
    return list(built.values())


def resolve_device_dtype(cfg: DictConfig) -> tuple:
    import torch

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype
    if dtype == "auto":
        # Training's rule (core/precision.py), not lm-eval's own "auto" (the checkpoint's dtype):
        # bf16 only where the device computes it natively, emulated bf16 runs slower than fp32.
        gpu = not device.startswith("cpu")
        dtype = auto_torch_dtype_name(gpu, gpu and torch.cuda.is_bf16_supported(including_emulation=False))
    return device, dtype


def visible_gpus() -> Tuple[int, Optional[int]]:
    """(GPUs this process sees, memory of the first in bytes; None without one)."""
    import torch

    if not torch.cuda.is_available():
        return 0, None
    return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory


def layout_for(cfg: DictConfig, model_dir: Path, parameters: Optional[int], launched: Launched) -> Layout:
    """Where the model goes (evaluation/parallel.py), from its size and this node's GPUs."""
    gpus, gpu_memory = visible_gpus()
    if cfg.gpu_memory_gb is not None:
        gpu_memory = int(cfg.gpu_memory_gb * 1e9)
    _, dtype = resolve_device_dtype(cfg)
    max_length = bounded_max_length(cfg.max_length, model_dir)
    return plan_layout(cfg, weight_bytes(parameters, dtype), max_length, gpus, gpu_memory, launched)


def model_arguments(cfg: DictConfig, model_dir: Path, dtype: str, layout: Layout) -> dict:
    """lm-eval's model arguments: the layout's, then model_args (which win)."""
    extra = OmegaConf.to_container(cfg.model_args)
    placed = dict(layout.model_args)
    if "max_model_len" in extra:  # vllm's other name for max_length; lm-eval refuses both at once
        placed.pop("max_length", None)
    return {"pretrained": str(model_dir), "dtype": dtype, **placed, **extra}


def join_process_group(lm) -> None:
    """Make lm-eval's HFLM score a share per process on CPUs too. HFLM (0.4.13) turns on its data
    parallelism only when torch.cuda.device_count() > 1; under a launcher on CPUs (gloo) it keeps
    rank 0 of 1 in every process, so each would score everything and write the results."""
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is not None and lm.world_size == 1 and accelerator.num_processes > 1:
        lm._rank, lm._world_size = accelerator.local_process_index, accelerator.num_processes


def load_model(cfg: DictConfig, model_dir: Path, layout: Layout):
    """lm-eval's model object for the backend, loaded once for every task."""
    import os

    from lm_eval.api.registry import get_model

    device, dtype = resolve_device_dtype(cfg)
    if layout.processes > 1 and device.startswith("cpu"):
        os.environ["ACCELERATE_USE_CPU"] = "1"  # accelerate's multi-process CPU mode (gloo), as `accelerate launch --cpu`
    args = model_arguments(cfg, model_dir, dtype, layout)
    try:
        model_class = get_model(cfg.backend)
        lm = model_class.create_from_arg_obj(args, {"batch_size": cfg.batch_size, "device": device})
    except (ImportError, ModuleNotFoundError) as err:
        raise UserError(f"backend={cfg.backend} needs a package that is not installed ({err})") from err
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"cannot load the model in {model_dir} ({first})") from err
    join_process_group(lm)
    return lm


def leave_process_group(lm) -> None:
    """End the data-parallel group accelerate started, every rank together, once the shares are
    gathered. A rank that simply exits tears gloo's threads down while its peers still talk, and
    can abort with "terminate called without an active exception" (SIGABRT, seen in CI, which
    fails the eval job after a good run), as training's shutdown_process_group explains."""
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()


def use_chat_template(cfg: DictConfig, lm) -> bool:
    tokenizer = getattr(lm, "tokenizer", None)
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template and not has:
        raise UserError(f"chat_template=true, but {cfg.model_dir} has no chat template: set chat_template=false")
    return has if cfg.chat_template is None else bool(cfg.chat_template)


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    return versions


def task_records(results: dict, cfg: DictConfig, model_dir: Path, chat: bool) -> List[dict]:
    """One self-contained record per evaluated task (groups are left to their subtasks)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    versions = library_versions()
    records = []
    for task, counts in results["n-samples"].items():
        config = results["configs"][task]
        records.append({
            "task": task,
            "model_dir": str(model_dir),
            "n": int(counts["effective"]),
            "n_available": int(counts["original"]),
            "output_type": config["output_type"],
            "chat_template": chat,
            "results": results["results"][task],
            "higher_is_better": results["higher_is_better"].get(task, {}),
            "n_shot": results["n-shot"].get(task),
            "task_version": results["versions"].get(task),
            "task_config": config,
            "settings": settings,
            "versions": versions,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    return records


def in_document_order(samples: dict) -> dict:
    """Each task's samples by doc_id: lm-eval gathers them rank after rank (0, 2, 4, ..., 1, 3, ...
    with two processes), and the file must not depend on how many processes scored it."""
    return {task: sorted(rows, key=lambda row: row["doc_id"]) for task, rows in samples.items()}


# Seconds to wait after each task's result file, so a test can kill an evaluation between two
# tasks' files (as training's DOMAINFORGE_TRAIN_PAUSE_BEFORE_PUBLISH).
PUBLISH_PAUSE_ENV = "DOMAINFORGE_EVAL_PAUSE_AFTER_TASK"


def publish(records: List[dict], samples: dict, out_dir: Path, keep_samples: bool = True) -> None:
    """Samples and per-item scores first, then the result file: a <task>.json on disk means all
    are complete. Every multiple-choice task gets its small <task>.items.jsonl (evaluation/items.py),
    which the study report reads; <task>.samples.jsonl (every prompt) only with keep_samples."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pause = float(os.environ.get(PUBLISH_PAUSE_ENV, "0") or 0)
    for record in records:
        task = record["task"]
        if task in samples and keep_samples:
            lines = "".join(json.dumps(s, default=str) + "\n" for s in samples[task])
            write_atomic(out_dir / f"{task}.samples.jsonl", lines)
        items = item_lines(samples[task]) if task in samples and record["output_type"] == "multiple_choice" else None
        if items is not None:
            write_atomic(items_path(out_dir, task), items)
        write_atomic(out_dir / f"{task}.json", json.dumps(record, indent=2, default=str) + "\n")
        if pause:
            print(f"wrote {out_dir / task}.json; the next in {pause:g}s", flush=True)
            time.sleep(pause)


def unscored(tasks: List[str], out_dir: Path) -> List[str]:
    """The tasks without a result file in out_dir (skip_scored=true), saying which are kept."""
    kept = [t for t in tasks if (out_dir / f"{t}.json").is_file()]
    if kept:
        print(f"skip_scored: keeping the results of {', '.join(kept)} in {out_dir}", flush=True)
    return [t for t in tasks if t not in kept]


def check_backend_installed(backend: str) -> None:
    """vllm is an optional package: refuse before any task is built or model loaded."""
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("backend=vllm but vllm is not installed: pip install vllm (GPUs), or set backend=hf")


SAMPLE_ROWS = 200  # per task in the W&B table: enough to read the model's answers, small to upload


def log_to_wandb(records: List[dict], samples: dict, cfg: DictConfig) -> None:
    """When the pipeline turns W&B on: every metric as a summary value, and per task a table of
    questions with the model's (filtered) answer, the target and the per-question score."""
    summary, tables = {}, {}
    for record in records:
        task = record["task"]
        for metric, value, _ in metric_values(record["results"]):
            summary[f"{task}/{metric}"] = value
        rows = []
        for sample in samples.get(task, [])[:SAMPLE_ROWS]:
            scores = {m: sample[m] for m in record["higher_is_better"] if m in sample}
            rows.append([sample.get("doc_id"), str(sample.get("target")), str(sample.get("filtered_resps"))[:500],
                         json.dumps(scores)])
        tables[f"samples/{task}"] = (["doc_id", "target", "answer", "scores"], rows)
    log_wandb_run("eval", {"model_dir": str(cfg.model_dir), "tasks": list(cfg.tasks), "limit": cfg.limit},
                  summary, tables=tables)


def evaluate(cfg: DictConfig) -> List[dict]:
    """Evaluate cfg.tasks (+ cfg.eval_sets) on cfg.model_dir; the records written, one per task."""
    model_dir, parameters = check_model_dir(cfg)
    check_backend_installed(cfg.backend)
    launched = Launched.from_env()
    layout = layout_for(cfg, model_dir, parameters, launched)
    if launched.rank >= layout.processes:
        print(f"rank {launched.rank}: not needed, rank 0 evaluates ({layout.reason})", flush=True)
        return []
    if launched.world_size > layout.processes:
        leave_single_process()
    if launched.rank == 0:
        print(f"evaluation layout: {layout.reason}", flush=True)
    user_folders = [Path(p).expanduser().resolve() for p in cfg.include_path]
    for folder in user_folders:
        if not folder.is_dir():
            raise UserError(f"include_path: {folder} is not a folder: give folders of lm-eval task YAMLs")
    out_dir = Path(cfg.output_dir).expanduser() if cfg.output_dir else model_dir / EVAL_DIR

    with tempfile.TemporaryDirectory(prefix="domainforge-tasks-") as generated:
        tasks = list(dict.fromkeys([*cfg.tasks, *write_eval_set_tasks(list(cfg.eval_sets), Path(generated))]))
        if cfg.skip_scored:
            tasks = unscored(tasks, out_dir)
            if not tasks:
                print(f"every task has its result in {out_dir}: nothing to evaluate", flush=True)
                return []
        manager = task_manager_for(tasks, [TASK_DIR, *user_folders, Path(generated)], user_folders)
        built = build_tasks(tasks, manager)

        from lm_eval import simple_evaluate

        lm = load_model(cfg, model_dir, layout)
        chat = use_chat_template(cfg, lm)
        print(f"evaluating {model_dir} on {', '.join(tasks)} ({'chat template' if chat else 'plain prompts'})",
              flush=True)
        results = simple_evaluate(
            model=lm,
            tasks=built,
            task_manager=manager,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat,
            system_instruction=cfg.system_instruction,
            log_samples=True,  # the per-item scores come from the samples; log_samples decides what is written
            bootstrap_iters=1000,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
    leave_process_group(lm)
    if results is None:  # not rank 0 of a data-parallel run: rank 0 writes
        return []
    records = task_records(results, cfg, model_dir, chat)
    samples = in_document_order(results.get("samples", {}))
    publish(records, samples, out_dir, keep_samples=cfg.log_samples)
    if out_dir == model_dir / EVAL_DIR:
        refresh_model_card(model_dir)  # the card lists the results beside it (no-op without lineage.json)
    log_to_wandb(records, samples if cfg.log_samples else {}, cfg)
    print(format_table(records), flush=True)
    print(f"results: {out_dir}/<task>.json", flush=True)
    return records


def evaluate_overrides(argv: List[str], model_dir: Optional[str] = None) -> List[dict]:
    """The command line of launch/eval.py: [MODEL_DIR] key=value ..."""
    from evaluation.config import compose_eval_config

    overrides = ([f"model_dir={model_dir}"] if model_dir else []) + list(argv)
    return evaluate(compose_eval_config(overrides))


if __name__ == "__main__":  # pragma: no cover - use launch/eval.py
    sys.exit("run: python launch/eval.py MODEL_DIR [tasks=[...]]")
