"""Streaming, sharded merger with mergekit's merge methods (slerp, linear, nuslerp, model_stock and the
task-arithmetic family: ties, dare, breadcrumbs, della, ...), a drop-in for `mergekit-yaml`: see docs/merge.md."""
