"""Above training, merging and evaluation: pipelines of steps, their SLURM jobs, and the
study report. It starts the other packages' entry points as processes and reads their
outputs; it imports no torch, so it runs on a login node."""
