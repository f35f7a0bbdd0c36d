"""Evaluation on lm-evaluation-harness: bundled held-out eval sets in the paper's MC/TF format
under both of its scoring protocols (evaluation/tasks/), one result file per task and model
(run.py, results.py), and a merge's synergy with its parents as arithmetic on those files
(synergy.py). Imports only `core` among the project's packages."""
