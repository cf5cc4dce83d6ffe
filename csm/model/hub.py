"""Hugging Face hub access: fetch the needed files of a repo (at a pinned revision), tell a
hub id from a local path, and turn the hub's many failure types into one line that says what to do.
"""
from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import errors

from csm.system.errors import UserError


def hub_error(what: str, source: str, err: Exception, local_hint: str) -> UserError:
    """One clear line for a hub failure: gated, unreachable, missing, or something else (named)."""
    text = str(err).lower()
    def says(*words: str) -> bool:
        return any(word in text for word in words)

    if isinstance(err, errors.RevisionNotFoundError) or says("revision not found", "invalid rev id",
                                                             "not a valid git revision"):
        why = "no such revision (branch, tag or commit) in that repository"
    elif isinstance(err, errors.GatedRepoError) or says("gated", "401", "403", "restricted"):
        why = "it is gated: accept its licence on huggingface.co, then `hf auth login` or set HF_TOKEN in .env"
    elif says("offline", "connect", "resolve", "network", "not found in the cache", "cannot find the requested files",
              "outgoing traffic has been disabled"):
        why = "the hub cannot be reached and it is not in the local cache"
    elif says("does not exist", "404", "not a valid model identifier", "repository not found"):
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
    from huggingface_hub import snapshot_download  # 0.3 s to import: downloads only

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # the hub raises many unrelated types (HTTP, offline, gated, OSError)
        raise hub_error(what, repo_id, e, local_hint) from e


def looks_like_repo_id(source: str) -> bool:
    """'owner/name' that is not a checkpoint file name."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.endswith((".pt",
                                                                                              ".pth", ".safetensors"))
