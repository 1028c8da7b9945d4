"""A Hugging Face hub cache built from local folders, for code that names checkpoints by hub id.

`add_snapshot` lays a folder's files out as `huggingface_hub` lays a download:

    <cache>/models--Qwen--Qwen2-VL-7B-Instruct/
        refs/main                          -> "<commit>"
        blobs/<sha256 of the file>         the bytes
        snapshots/<commit>/<file>          a relative symlink to ../../blobs/<sha256>

`use_hub_cache` points `huggingface_hub` (and through it `transformers`, which reads
`huggingface_hub.constants.HF_HUB_CACHE` at call time) at such a cache; with `HF_HUB_OFFLINE=1`
(set by conftest) `snapshot_download(id)` and `from_pretrained(id)` then resolve from it alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub.constants
import pytest


def repo_folder(cache: str | Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def add_snapshot(cache: str | Path, repo_id: str, source: str | Path) -> str:
    """Copy every file under `source` into `cache` as the `main` revision of model `repo_id`;
    returns the snapshot folder (what `snapshot_download(repo_id)` returns)."""
    source = Path(source)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    assert files, f"{source} holds no files"
    digest = hashlib.sha1(repo_id.encode())
    blobs = {}
    for path in files:
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        blobs[path.relative_to(source)] = (blob, data)
        digest.update(f"{path.relative_to(source)}:{blob}".encode())
    commit = digest.hexdigest()  # 40 hex digits, as a git commit id
    repo = repo_folder(Path(cache).resolve(), repo_id)
    snapshot = repo / "snapshots" / commit
    for rel, (blob, data) in blobs.items():
        blob_path = repo / "blobs" / blob
        blob_path.parent.mkdir(parents=True, exist_ok=True)
        blob_path.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob_path, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return str(snapshot)


def use_hub_cache(mp: pytest.MonkeyPatch, cache: str | Path) -> None:
    """Resolve hub ids from `cache` only, in this process (and in subprocesses it starts)."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE, "set HF_HUB_OFFLINE=1 before importing"
    mp.setenv("HF_HUB_CACHE", str(cache))
    # NOTE: huggingface_hub read HF_HUB_CACHE when it was imported; its functions (and
    # transformers' cached_file) read this constant whenever no cache_dir is passed.
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
