"""Models and coders by Hugging Face hub id: ``--model EleutherAI/pythia-160m``,
``--coder-checkpoint hf:ORG/REPO/SUBFOLDER``.

A hub id is looked up in huggingface_hub's own cache first, then downloaded into it, unless ``HF_HUB_OFFLINE`` is
set (then only the cache is used). Nothing else in nl_rewrite reaches for a network: the embedded models, local
folders and GGUF files never do, so the default run and the tests stay offline. Where neither the cache nor the
network has the repo, the error names the repo and how to fetch it.
"""

from __future__ import annotations

import os
from pathlib import Path

from nl_rewrite.errors import ModelLoadError

HF_SPEC = "hf:"
"""The prefix of a coder given by hub id: ``hf:ORG/REPO`` or ``hf:ORG/REPO/SUBFOLDER`` (a folder in the repo)."""


def offline() -> bool:
    """Whether the user asked huggingface_hub to stay off the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def split_spec(spec: str) -> tuple[str, str | None]:
    """``hf:ORG/REPO[/SUBFOLDER]`` as (repo id, subfolder or None)."""
    parts = spec[len(HF_SPEC):].strip("/").split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise ModelLoadError(f"{spec!r} is not a hub coder: write hf:ORG/REPO or hf:ORG/REPO/SUBFOLDER")
    return f"{parts[0]}/{parts[1]}", parts[2] if len(parts) == 3 else None


def snapshot(repo_id: str, what: str, marker: str, subfolder: str | None = None) -> Path:
    """The local folder of ``repo_id`` (only ``subfolder`` of it when given): from the huggingface_hub cache when the
    folder there holds ``marker`` (``config.json`` for a model, ``cfg.json`` for a coder), else downloaded into it.
    ``what`` ("model", "coder") names it in errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    patterns = [f"{subfolder}/*"] if subfolder else None
    fetch = f"`hf download {repo_id}{f' --include {subfolder}/*' if subfolder else ''}`"
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except HFValidationError as exc:
        raise ModelLoadError(f"{what} {repo_id!r} is not a hub id ({exc})") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        root = None
    # a cached snapshot may hold other files of the repo only (another layer's folder, the tokenizer alone)
    if root is None or not (root / (subfolder or "") / marker).is_file():
        root = download(repo_id, what, patterns, fetch)
    folder = root / subfolder if subfolder else root
    if not (folder / marker).is_file():
        raise ModelLoadError(f"{what} {repo_id!r} has no {marker} in {subfolder or 'its root'}: is it a {what}?")
    return folder


def download(repo_id: str, what: str, patterns: list[str] | None, fetch: str) -> Path:
    """``repo_id`` (its files matching ``patterns``) downloaded into the huggingface_hub cache, or a clear error."""
    from huggingface_hub import snapshot_download

    if offline():
        raise ModelLoadError(f"{what} {repo_id!r} is not in the local huggingface_hub cache and HF_HUB_OFFLINE is "
                             f"set: fetch it on a machine with a network ({fetch}) and point HF_HOME at that "
                             "cache, or unset HF_HUB_OFFLINE")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # no network, no such repo, a gated repo: all end here, said plainly
        raise ModelLoadError(f"{what} {repo_id!r} is not in the local huggingface_hub cache and could not be "
                             f"downloaded ({type(exc).__name__}: {exc}); check the id and the network, or fetch "
                             f"it where one exists with {fetch}") from exc
