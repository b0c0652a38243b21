"""Checkpoints: atomic publication, pruning, and detection of damage."""

import pytest

from leviathan.errors import CheckpointError
from leviathan.train.checkpoint import (
    LATEST,
    latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def write_payload(size: int):
    def write(directory):
        (directory / "model.pt").write_bytes(bytes(range(256)) * size)
        (directory / "sub").mkdir()
        (directory / "sub" / "shard.bin").write_bytes(b"x" * 10)

    return write


def test_save_publishes_latest_and_keeps_last_k(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, write_payload(4), keep_last=2)
    assert latest_checkpoint(tmp_path).name == "step_0000030"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000020", "step_0000030"]
    assert verify_checkpoint(tmp_path / "step_0000030")["step"] == 30
    assert not list(tmp_path.glob(".*tmp"))


def test_failed_write_leaves_previous_checkpoint_latest(tmp_path):
    save_checkpoint(tmp_path, 10, write_payload(4), keep_last=3)

    def crash(directory):
        (directory / "model.pt").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 20, crash, keep_last=3)
    assert latest_checkpoint(tmp_path).name == "step_0000010"
    assert not (tmp_path / "step_0000020").exists()


def test_truncated_file_is_detected(tmp_path):
    ckpt = save_checkpoint(tmp_path, 5, write_payload(4), keep_last=1)
    data = (ckpt / "model.pt").read_bytes()
    (ckpt / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt is truncated or altered"):
        verify_checkpoint(ckpt)


def test_flipped_byte_is_detected(tmp_path):
    ckpt = save_checkpoint(tmp_path, 5, write_payload(4), keep_last=1)
    data = bytearray((ckpt / "sub" / "shard.bin").read_bytes())
    data[3] ^= 0xFF
    (ckpt / "sub" / "shard.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"shard\.bin is corrupt: SHA-256 mismatch"):
        verify_checkpoint(ckpt)


def test_missing_manifest_and_dangling_pointer(tmp_path):
    ckpt = save_checkpoint(tmp_path, 5, write_payload(1), keep_last=1)
    (ckpt / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="no readable MANIFEST.json"):
        verify_checkpoint(ckpt)
    (tmp_path / LATEST).write_text("step_0000099\n")
    with pytest.raises(CheckpointError, match="points to step_0000099, which does not exist"):
        latest_checkpoint(tmp_path)
