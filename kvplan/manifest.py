"""Artifacts on disk: hashing, atomic writes, the target lock and manifest.json.

The manifest is the only thing that claims a build succeeded, so it is written
atomically, rewritten *before* a stage starts rebuilding (dropping that stage
and everything downstream), and says "complete" only after the last stage.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from kvplan.fileio import write_atomic

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
SCHEMA = 1


_HASHED: dict[tuple, str] | None = None


@contextlib.contextmanager
def hashes_remembered() -> Iterator[None]:
    """Inside, a file is hashed once per identity (inode, size, change times): a validation checks
    that the target is current before and after taking its lock and records the hashes at the end,
    about 1 GB of artifacts read three times. A build replaces files (a new inode) or rewrites
    them (new times); either is hashed again."""
    global _HASHED
    outer, _HASHED = _HASHED, {} if _HASHED is None else _HASHED
    try:
        yield
    finally:
        _HASHED = outer


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    key = None
    if _HASHED is not None:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _HASHED:
            return _HASHED[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    if key is not None:
        _HASHED[key] = h.hexdigest()
    return h.hexdigest()


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def source_digest(*relative: str) -> str:
    """Hash of kvplan's own source files (files or directories of .py), so a code change rebuilds."""
    h = hashlib.sha256()
    for rel in relative:
        path = PACKAGE_ROOT / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(PACKAGE_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())


def artifact(target: Path, path: Path, **extra) -> dict:
    """A manifest entry for a file under ``target``; its external data file travels with it."""
    entry = {"path": str(path.relative_to(target)), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    data = path.with_name(path.name + ".data")
    if data.exists():
        entry["external_data"] = {"path": str(data.relative_to(target)), "sha256": sha256_file(data),
                                  "bytes": data.stat().st_size}
    entry.update(extra)
    return entry


def artifacts_intact(target: Path, entries: list[dict]) -> bool:
    """Every recorded file exists with its recorded size and hash."""
    for entry in entries:
        for e in (entry, entry.get("external_data")):
            if not e:
                continue
            p = target / e["path"]
            if not p.is_file() or p.stat().st_size != e["bytes"] or sha256_file(p) != e["sha256"]:
                return False
    return True


def load_manifest(target: Path) -> dict | None:
    path = target / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if data.get("schema") == SCHEMA else None


@contextlib.contextmanager
def target_lock(target: Path, log=print) -> Iterator[None]:
    """Serialise builds of one target: a second build waits instead of interleaving writes."""
    target.mkdir(parents=True, exist_ok=True)
    lock_path = target / ".kvplan.lock"
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            log(f"another build of {target} is running (pid {holder}); waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
