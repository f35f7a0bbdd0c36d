"""Dataset loaders the task YAMLs in this folder name with `custom_dataset: !function ...`.

lm-eval imports this file by its path, inside a process that already runs evaluation/ (launch/
eval.py and the tests put the repository on sys.path); the checks themselves live in
evaluation/benchmark.py. lm-eval calls a loader with the task's metadata and dataset_kwargs as
keyword arguments.
"""

from evaluation.benchmark import load_benchmark, read_jsonl


def _as_test_split(rows):
    from datasets import Dataset, DatasetDict

    return DatasetDict(test=Dataset.from_list(rows))


def benchmark(data_files=None, **_):
    """A paper-format MC or TF benchmark (checked, with `label` and `lettered` added)."""
    return _as_test_split(load_benchmark(data_files))


def jsonl(data_files=None, **_):
    """Any JSONL file, unchecked (e.g. the preference pairs)."""
    return _as_test_split(read_jsonl(data_files))
