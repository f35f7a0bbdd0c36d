"""W&B runs for the steps that do not train (merge, eval, study), so that a pipeline's W&B group
holds every curve, score and plot. Training runs log through transformers' WandbCallback.

Off unless DOMAINFORGE_WANDB is set (orchestration/steps.py sets it with pipeline.wandb,
next to W&B's own WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_JOB_TYPE,
WANDB_NAME and WANDB_DIR).
Secrets never pass through here: wandb reads its API key from its own login file or env.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional


DEFAULT_WANDB_PROJECT = "domainforge"
"""The W&B project of every run, training or not, unless logging.project / pipeline.wandb_project say otherwise."""


def wandb_enabled() -> bool:
    return bool(os.environ.get("DOMAINFORGE_WANDB"))


def log_wandb_run(
    job_type: str,
    config: dict,
    summary: Dict[str, float],
    tables: Optional[Dict[str, tuple]] = None,
    images: Optional[Dict[str, str]] = None,
) -> Optional[str]:
    """One finished W&B run: `config`, `summary` metrics, tables {key: (columns, rows)} and PNG
    images {key: path}. Returns the run's local directory, or None when W&B is off."""
    if not wandb_enabled():
        return None
    import wandb  # imported here: wandb is slow to import and most runs do not log

    # The project is named, not inferred: W&B would otherwise file the run under "uncategorized".
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_WANDB_PROJECT),
                     job_type=os.environ.get("WANDB_JOB_TYPE", job_type), config=config, reinit="finish_previous")
    payload: Dict[str, object] = dict(summary)
    for key, (columns, rows) in (tables or {}).items():
        payload[key] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
    for key, path in (images or {}).items():
        payload[key] = wandb.Image(path)
    run.log(payload)
    run.summary.update(summary)
    directory = run.dir
    run.finish()
    return directory


def table_rows(rows: List[dict], columns: List[str]) -> tuple:
    """(columns, rows) for log_wandb_run from a list of dicts."""
    return columns, [[row.get(c) for c in columns] for row in rows]
