"""Dataset loaders the task YAMLs in this folder name with `custom_dataset: !function ...`.

lm-eval imports this file by its path, inside a process that already runs evaluation/ (launch/
eval.py and the tests put the repository on sys.path); the checks themselves live in
evaluation/eval_set.py. lm-eval calls a loader with the task's metadata and dataset_kwargs as
keyword arguments.
"""

from evaluation.eval_set import load_eval_set, read_jsonl


def _as_test_split(rows):
    from datasets import Dataset, DatasetDict

    return DatasetDict(test=Dataset.from_list(rows))


def eval_set(data_files=None, **_):
    """A paper-format MC or TF eval set (checked, with `label` and `lettered` added)."""
    return _as_test_split(load_eval_set(data_files))


def jsonl(data_files=None, **_):
    """Any JSONL file, unchecked (e.g. the preference pairs)."""
    return _as_test_split(read_jsonl(data_files))
