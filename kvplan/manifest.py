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
import stat
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


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


# Artifacts are not fsynced (kvplan.fileio): after a crash of the machine a file may keep its
# recorded size and times while bytes the kernel had not written yet are lost. An identity therefore
# holds within one boot only; where the system has no boot id, none is recorded and files are hashed.
BOOT_ID = _boot_id()


def file_identity(st: os.stat_result) -> list | None:
    """What changes whenever a file's bytes may have: a new file (device, inode), or a write to it
    (size, modification time, and the change time, which no tool can set back, not even a copy that
    preserves times), or a reboot since (BOOT_ID)."""
    if BOOT_ID is None:
        return None
    return [BOOT_ID, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def artifact(target: Path, path: Path, **extra) -> dict:
    """A manifest entry for a file under ``target``; its external data file travels with it."""
    entry = _file_entry(target, path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        entry["external_data"] = _file_entry(target, data)
    entry.update(extra)
    return entry


def _file_entry(target: Path, path: Path) -> dict:
    st = path.stat()
    entry = {"path": str(path.relative_to(target)), "sha256": sha256_file(path), "bytes": st.st_size}
    _remember_identity(entry, path, st)
    return entry


def _remember_identity(entry: dict, path: Path, before: os.stat_result) -> None:
    """Record the identity ``path`` had when its bytes were hashed (``before``), unless it changed
    while they were read (then it has none, and the next check hashes it)."""
    identity = file_identity(before)
    if identity is not None and file_identity(path.stat()) == identity:
        entry["identity"] = identity
    else:
        entry.pop("identity", None)


def artifacts_intact(target: Path, entries: list[dict], refresh: bool = False) -> bool:
    """Every recorded file exists with its recorded size and hash. A file whose identity is the one
    recorded when it was hashed is not read again (a build system's no-op decides from file
    identities, as make and ninja do from times); any other is hashed. With ``refresh`` its entry
    then records the identity it was hashed with, for the manifest the caller writes next (after a
    reboot one no-op hashes; the next need not)."""
    for entry in entries:
        for e in (entry, entry.get("external_data")):
            if not e:
                continue
            p = target / e["path"]
            try:
                st = p.stat()
            except OSError:
                return False
            if not stat.S_ISREG(st.st_mode) or st.st_size != e["bytes"]:
                return False
            identity = file_identity(st)
            if identity is not None and e.get("identity") == identity:
                continue
            if sha256_file(p) != e["sha256"]:
                return False
            if refresh:
                _remember_identity(e, p, st)
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
