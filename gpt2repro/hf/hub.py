"""Uploading an export directory to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, first_line
from ..io import is_hub_id
from .export import HF_FILES, export_checkpoint

COMMIT_MESSAGE = "Upload GPT-2 model trained with gpt2repro"


def hub_token(repo_id: str) -> str:
    """The Hugging Face token for pushing to repo_id, or a one-line UserError saying why there is none."""
    import huggingface_hub

    token = huggingface_hub.get_token()
    if token is None:
        raise UserError(f"pushing to {repo_id} needs a Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    return token


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

    hub_token(repo_id)
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=model_dir, revision=revision,
            allow_patterns=[name for name, _ in files], commit_message=COMMIT_MESSAGE,
        )
    # huggingface_hub raises its own HTTP errors, OSError subclasses and its HTTP client's errors; all
    # mean the same to a user here: the push did not happen, for the reason in the first line
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot push to {repo_id} on the Hugging Face Hub: {first_line(e)}") from None
    plan["url"] = getattr(commit, "commit_url", None) or str(commit)
    return plan


class BackgroundPush:
    """Pushes a run's checkpoints, exported, to a Hub model repository while training goes on.

    `push(checkpoint)` exports the checkpoint into RUN/hf and starts its upload in the background
    (`HfApi.upload_folder(run_as_future=True)`); while an upload is in flight, a later checkpoint's
    push is skipped, so the export directory never changes under an upload. An upload that fails is
    reported, never raised: training does not stop for the Hub. `finish()` waits for the last one.
    """

    def __init__(self, repo_id: str, run_dir: Path, report):
        import huggingface_hub

        self.repo_id, self.export_dir, self.report = repo_id, Path(run_dir) / "hf", report
        self.api = huggingface_hub.HfApi(token=hub_token(repo_id))
        self.pending, self.repo_ready = None, False

    def push(self, checkpoint: Path) -> None:
        if self.pending is not None and not self.pending[1].done():
            self.report(f"hub: still uploading {self.pending[0].name}; {checkpoint.name} is not pushed")
            return
        self._collect()
        try:
            export_checkpoint(checkpoint, self.export_dir)
            if not self.repo_ready:
                self.api.create_repo(self.repo_id, repo_type="model", exist_ok=True)
                self.repo_ready = True
            future = self.api.upload_folder(repo_id=self.repo_id, repo_type="model", folder_path=self.export_dir,
                                            commit_message=f"{COMMIT_MESSAGE} ({checkpoint.name})", run_as_future=True)
        except Exception as e:  # noqa: BLE001 - the Hub's errors (network, auth, quota) never stop training
            self.report(f"hub: cannot push {checkpoint.name} to {self.repo_id}: {first_line(e)}")
            return
        self.pending = (checkpoint, future)
        self.report(f"hub: uploading {checkpoint.name} to {self.repo_id} in the background")

    def finish(self) -> None:
        """Wait for the upload in flight and report how it ended."""
        if self.pending is not None:
            self.pending[1].exception()  # waits
        self._collect()

    def _collect(self) -> None:
        if self.pending is None or not self.pending[1].done():
            return
        checkpoint, future = self.pending
        self.pending = None
        error = future.exception()
        if error is not None:
            self.report(f"hub: the upload of {checkpoint.name} to {self.repo_id} failed: {first_line(error)}")
        else:
            self.report(f"hub: pushed {checkpoint.name} to {self.repo_id}: {getattr(future.result(), 'commit_url', '')}")
