"""The bundled data sets and their generators, run as modules from the repository root:
`python -m data.make_materials`, `python -m data.make_eval_sets`, ... (see data/README.md)."""
