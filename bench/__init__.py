"""Benchmarks, run as modules from the repository root: `python -m bench.<name> ...` (each
module's docstring gives its command lines), so that they import the project's packages as the
tests do. bench/plain_trl_cpt.py, the plain TRL comparison, is a file the deepspeed launcher runs."""
