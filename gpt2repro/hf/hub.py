"""Uploading an export directory to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, first_line
from ..io import is_hub_id
from .export import HF_FILES

def upload_plan(model_dir) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file push_to_hub uploads: all files of an export, hidden ones aside."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a directory")
    missing = [name for name in HF_FILES if not (model_dir / name).is_file()]
    if missing:
        raise UserError(f"{model_dir} is not a gpt2repro export (missing {', '.join(missing)}); run gpt2repro export first")
    files = []
    for path in sorted(model_dir.rglob("*")):
        relative = path.relative_to(model_dir)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def push_to_hub(model_dir, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False) -> dict:
    """Upload an export directory to a Hub model repository (created if needed) in one commit.

    The token is the usual one (`hf auth login`, or HF_TOKEN). Returns what is (or with dry_run,
    would be) uploaded: {"repo_id", "private", "revision", "files": [(path, bytes)], "card"}, plus
    "url" of the commit after a real push.
    """
    model_dir = Path(model_dir).expanduser()
    files = upload_plan(model_dir)
    if not is_hub_id(repo_id, owner_required=True):
        raise UserError(f"--repo-id must look like USER/NAME, got {repo_id!r}")
    plan = {
        "repo_id": repo_id, "private": private, "revision": revision or "main",
        "files": files, "card": (model_dir / "README.md").read_text(encoding="utf-8"),
    }
    if dry_run:
        return plan
    import huggingface_hub

    if huggingface_hub.get_token() is None:
        raise UserError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=model_dir, revision=revision,
            allow_patterns=[name for name, _ in files], commit_message="Upload GPT-2 model trained with gpt2repro",
        )
    # huggingface_hub raises its own HTTP errors, OSError subclasses and its HTTP client's errors; all
    # mean the same to a user here: the push did not happen, for the reason in the first line
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot push to {repo_id} on the Hugging Face Hub: {first_line(e)}") from None
    plan["url"] = getattr(commit, "commit_url", None) or str(commit)
    return plan
