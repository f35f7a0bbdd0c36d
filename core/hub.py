"""Upload a finished model directory to the Hugging Face Hub with huggingface_hub
(`HfApi.create_repo` + `upload_folder`).

The upload runs only after the model is published locally, so a failed upload never touches
the local output. A failure is one `error: hub push ...` line and exit code 2: the user asked
for the upload, so a run that did not deliver it must not look successful (a SLURM chain
stops there); the message says how to retry the upload alone.

The token is huggingface_hub's own: HF_TOKEN, or the file `hf auth login` wrote. It is never
read or written here. HF_ENDPOINT points the client at another Hub (the tests use a local one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.errors import UserError

# Never uploaded: run scratch (the final model's temp dir, offline W&B runs).
ALWAYS_SKIPPED = [".final-tmp/**", "wandb/**", "*.lock"]
CHECKPOINT_PATTERNS = ["checkpoints/**"]


@dataclass
class HubConfig:
    push: bool = False
    """Upload the final model to the Hub once it is saved locally."""
    repo_id: Optional[str] = None
    """`<user or org>/<name>`; required with push=true."""
    private: bool = True
    """Create the repository private (an existing repository keeps its visibility)."""
    checkpoints: bool = False
    """Also upload <output_dir>/checkpoints/ (DeepSpeed states: large)."""


def check_hub(hub: HubConfig) -> None:
    """Bad hub settings fail before anything is trained."""
    if not hub.push:
        return
    if not hub.repo_id or hub.repo_id.count("/") != 1 or not all(hub.repo_id.split("/")):
        raise UserError(
            f"hub.push=true needs hub.repo_id=<user or org>/<name> (got {hub.repo_id!r}): set it, or hub.push=false"
        )


def push_to_hub(model_dir: str | Path, hub: HubConfig) -> str:
    """Upload `model_dir` (a finished model) to `hub.repo_id`; returns the commit URL."""
    from huggingface_hub import HfApi

    ignore = list(ALWAYS_SKIPPED) + ([] if hub.checkpoints else CHECKPOINT_PATTERNS)
    api = HfApi()
    try:
        api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(model_dir),
            repo_id=hub.repo_id,
            commit_message=f"domainforge: upload {Path(model_dir).name}",
            ignore_patterns=ignore,
        )
    except Exception as err:  # network, auth, quota: all end the same way for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"hub push of {model_dir} to {hub.repo_id} failed ({type(err).__name__}: {first}); the local model "
            f"is complete: check HF_TOKEN / `hf auth login`, then retry with `hf upload {hub.repo_id} {model_dir}`"
        ) from err
    return str(getattr(commit, "commit_url", commit))
