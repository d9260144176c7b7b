"""Up-to-dateness from file identities: an artifact whose identity is the one recorded when it was
hashed is not read again; any change of its bytes changes the identity and makes it hashed."""
from __future__ import annotations

import os

import pytest

import kvplan.manifest as manifest


@pytest.fixture
def entry(tmp_path):
    path = tmp_path / "decoder.plan"
    path.write_bytes(b"plan bytes " * 1000)
    return path, manifest.artifact(tmp_path, path)


def _no_hashing(monkeypatch):
    def refuse(path, *a, **k):
        raise AssertionError(f"{path} was hashed")
    monkeypatch.setattr(manifest, "sha256_file", refuse)


def test_an_artifact_records_the_identity_it_was_hashed_with(entry):
    path, record = entry
    assert record["identity"] == manifest.file_identity(path.stat())


def test_an_unchanged_artifact_is_not_read_again(entry, monkeypatch):
    path, record = entry
    _no_hashing(monkeypatch)
    assert manifest.artifacts_intact(path.parent, [record])


def test_a_rewrite_of_the_same_size_with_its_times_put_back_is_hashed_and_refused(entry):
    path, record = entry
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))       # what cp -p or rsync -a would leave
    assert path.stat().st_size == record["bytes"]
    assert not manifest.artifacts_intact(path.parent, [record])


def test_a_copy_with_the_same_bytes_is_hashed_and_accepted(entry):
    path, record = entry
    copy = path.with_name("copy")
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)                                   # a new inode, the same bytes
    assert manifest.artifacts_intact(path.parent, [record])


def test_an_entry_from_an_older_manifest_without_identity_is_hashed(entry):
    path, record = entry
    del record["identity"]
    assert manifest.artifacts_intact(path.parent, [record])
    path.write_bytes(b"other")
    assert not manifest.artifacts_intact(path.parent, [record])


def test_an_identity_recorded_before_the_last_boot_is_not_trusted(entry, monkeypatch):
    path, record = entry
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[5] ^= 1                       # what a crash can leave: the size and times, not the bytes
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(manifest, "BOOT_ID", "another boot")
    assert not manifest.artifacts_intact(path.parent, [record])


def test_a_hashed_artifact_records_its_identity_so_the_next_check_need_not_hash(entry, monkeypatch):
    path, record = entry
    monkeypatch.setattr(manifest, "BOOT_ID", "after a reboot")
    assert manifest.artifacts_intact(path.parent, [record])
    assert record["identity"][0] != "after a reboot"          # a check alone changes no record
    assert manifest.artifacts_intact(path.parent, [record], refresh=True)
    assert record["identity"][0] == "after a reboot"
    _no_hashing(monkeypatch)
    assert manifest.artifacts_intact(path.parent, [record])


def test_without_a_boot_id_no_identity_is_recorded_and_every_check_hashes(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "BOOT_ID", None)
    path = tmp_path / "decoder.plan"
    path.write_bytes(b"plan bytes")
    record = manifest.artifact(tmp_path, path)
    assert "identity" not in record
    path.write_bytes(b"plan bytez")
    assert not manifest.artifacts_intact(tmp_path, [record])
