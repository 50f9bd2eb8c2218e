"""``python -m fewstep.export ... hub_repo=USER/NAME``: push an exported folder (or its LoRA) to the Hugging Face
Hub with ``huggingface_hub`` (log in once with ``hf auth login``, or set ``HF_TOKEN``)."""

from __future__ import annotations

import re
from pathlib import Path

from fewstep.errors import FewstepError, describe

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
PUSH_WHAT = ("auto", "pipeline", "lora")


class HubPushError(FewstepError, ValueError):
    """A bad ``hub_repo`` / ``hub_push`` or a refused upload; the message names the fix."""


def check_push_args(repo_id: str, what: str) -> None:
    """Fail before any export work on a repo id that cannot exist or an unknown ``hub_push``."""
    if not _REPO_ID.fullmatch(repo_id):
        raise HubPushError(f"hub_repo={repo_id} is not a hub repo id: give USER/NAME (or ORG/NAME)")
    if what not in PUSH_WHAT:
        raise HubPushError(f"hub_push={what} must be one of {', '.join(PUSH_WHAT)}")


def push_export(out: Path, repo_id: str, what: str = "auto", private: bool = False) -> dict:
    """Create ``repo_id`` (kept if it exists) and upload the export folder (``what=pipeline``) or its ``lora/``
    folder (``what=lora``; ``auto``: the LoRA of a LoRA run, else the pipeline). Returns what was pushed."""
    from huggingface_hub import HfApi

    check_push_args(repo_id, what)
    lora = out / "lora"
    if what == "auto":
        what = "lora" if lora.is_dir() else "pipeline"
    if what == "lora" and not lora.is_dir():
        raise HubPushError(f"hub_push=lora: {out} has no lora/ (the run was a full fine-tune); use hub_push=pipeline")
    folder = lora if what == "lora" else out
    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=f"fewstep export ({what})"
        )
    except Exception as err:  # noqa: BLE001 - auth, network and hub errors all end the push the same way
        raise HubPushError(
            f"hub_repo={repo_id}: the push failed ({describe(err)}); log in (hf auth login or "
            f"HF_TOKEN with write access) and check the network; the export itself is complete in {out}"
        ) from None
    return {"repo": repo_id, "pushed": what, "folder": str(folder), "url": str(url), "commit": str(commit)}
