"""Helpers the tests share, imported as `from tests.support.<module> import ...`:

    env.py          run the real entry points the way a user types them, and read their outcome
    models.py       the tiny Llama builder, the tiny tokenizer, model-directory readers
    merge.py        merge recipes, the merge command, an independent reference SLERP
    study.py        fake pipeline runs with eval files, for the study report
    eval_sets.py    the held-out eval sets and the check that no training text words them
    gpu.py          when tests/gpu/ is collected
    slurm_cluster.py, hub_standin.py, wandb_offline.py, count_tokenizer_calls.py
                    a local SLURM, a local Hub, an offline W&B reader, a counting train launcher

Fixtures (tiny_pair, slurm_cluster, ...) are registered in tests/conftest.py.
"""
