"""Streaming, sharded SLERP/linear merger (drop-in for `mergekit-yaml`): see docs/merge.md."""
