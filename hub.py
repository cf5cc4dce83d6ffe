"""Hugging Face hub access: fetch the needed files of a repo (at a pinned revision), tell a
hub id from a local path, and turn the hub's many failure types into one line that says what to do.
"""
from __future__ import annotations

import re
from pathlib import Path

from utils import UserError


def hub_error(what: str, source: str, err: Exception, local_hint: str) -> UserError:
    """One clear line for a hub failure: gated, unreachable, missing, or something else (named)."""
    from huggingface_hub import errors

    text = str(err).lower()
    if isinstance(err, errors.RevisionNotFoundError) or "revision not found" in text \
            or "invalid rev id" in text or "not a valid git revision" in text:
        why = "no such revision (branch, tag or commit) in that repository"
    elif isinstance(err, errors.GatedRepoError) or "gated" in text or "401" in text or "403" in text or "restricted" in text:
        why = "it is gated: accept its licence on huggingface.co, then `hf auth login` or set HF_TOKEN in .env"
    elif "offline" in text or "connect" in text or "resolve" in text or "network" in text or "not found in the cache" in text \
            or "cannot find the requested files" in text or "outgoing traffic has been disabled" in text:
        why = "the hub cannot be reached and it is not in the local cache"
    elif "does not exist" in text or "404" in text or "not a valid model identifier" in text or "repository not found" in text:
        why = "no such repository or file on the hub"
    else:
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    parent = Path(source).expanduser().parent
    if parent != Path(".") and parent.is_dir():  # 'runs/best' with 'runs/' present: a mistyped local path
        why += f"; nor is there a local {source!r} (the folder {str(parent)!r} has no such entry)"
    return UserError(f"could not load {what} {source!r}: {why}. {local_hint}")


def hub_snapshot(repo_id: str, patterns: list[str], what: str, local_hint: str, revision: str | None = None) -> Path:
    """The files of a hub repo that match `patterns` (and only those), downloaded or from the cache, at
    `revision` (a branch, tag or commit; default main). Returns the local snapshot directory."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # the hub raises many unrelated types (HTTP, offline, gated, OSError)
        raise hub_error(what, repo_id, e, local_hint) from e


def looks_like_repo_id(source: str) -> bool:
    """'owner/name' that is not a checkpoint file name."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.endswith((".pt", ".pth", ".safetensors"))
