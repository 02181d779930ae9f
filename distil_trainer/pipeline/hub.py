"""Push a saved student folder (config, safetensors, tokenizer, README.md model card) to the Hugging Face Hub.

The token is handed straight to `huggingface_hub.HfApi` and is never printed, logged or written: messages show a
masked form, and errors raised by the Hub client are re-raised with any occurrence of the token masked out.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def mask_token(token: str | None) -> str:
    """A printable stand-in for `token` ("hf_***" style), never the token itself."""
    if not token:
        return "<none>"
    return token[:3] + "***" if len(token) > 8 else "***"


def _check_student_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: save the student with save_pretrained() first.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: is it a save_pretrained() output folder?")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"{folder} has no safetensors weights ({' or '.join(_WEIGHT_FILES)}): save the "
                                "student with save_pretrained(safe_serialization=True).")


def push_student_to_hub(output_dir, repo_id: str, token: str | None = None, private: bool = False,
                        revision: str | None = None,
                        commit_message: str = "Upload distilled student with distil_trainer"):
    """Create `repo_id` if needed and upload `output_dir` in one commit; returns huggingface_hub's `CommitInfo`
    (`.commit_url`, `.oid`).

    `token=None` uses the locally saved login / HF_TOKEN. `revision` is a branch name; it is created from main
    when it does not exist yet. Checkpoint sub-folders and optimizer states are not uploaded.
    """
    from huggingface_hub import HfApi

    folder = Path(output_dir)
    _check_student_folder(folder)
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"repo_id {repo_id!r} is not a Hub repo id: use 'name' or 'namespace/name'.")

    api = HfApi(token=token)
    logger.info("Pushing %s to %s (token: %s)", folder, repo_id, mask_token(token))
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = repo_url.repo_id  # the Hub fills in the namespace when only a name was given
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=["checkpoint-*", "checkpoint-*/**", "*.pt", "*.pth", "*.bin", "training_args.bin",
                             "runs/**", ".*"],
        )
    except Exception as err:
        if token and token in str(err):
            masked = str(err).replace(token, mask_token(token))
            try:
                clean = type(err)(masked)
            except Exception:  # exception types whose constructor needs more than a message
                clean = RuntimeError(masked)
            raise clean from None  # `from None`: the original (unmasked) error is not chained
        raise
    logger.info("Pushed %s to %s: %s", folder, repo_id, commit.commit_url)
    return commit
