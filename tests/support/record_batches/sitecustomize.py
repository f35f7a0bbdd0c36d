"""Put this folder on PYTHONPATH and set RECORD_BATCHES_DIR: every rank of the command that
follows (`deepspeed --num_gpus 2 launch/train.py ...`, unchanged) appends one line per training
sequence it steps on, `<step> <token ids>`, to $RECORD_BATCHES_DIR/rank-<RANK>. Python imports
sitecustomize at start-up; the Trainer is wrapped once transformers.trainer is imported."""

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path


def record(training_step):
    def recorded(self, model, inputs, *args, **kwargs):
        path = Path(os.environ["RECORD_BATCHES_DIR"]) / f"rank-{os.environ.get('RANK', '0')}"
        with open(path, "a") as f:
            for row in inputs["input_ids"].tolist():
                f.write(f"{self.state.global_step} {' '.join(map(str, row))}\n")
        return training_step(self, model, inputs, *args, **kwargs)
    return recorded


class WrapTrainerOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.Trainer.training_step = record(module.Trainer.training_step)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("RECORD_BATCHES_DIR"):
    sys.meta_path.insert(0, WrapTrainerOnImport())
