"""Checkpoints and release weights are streamed to disk as the bytes safetensors writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from fedcommons.fileio import safetensors_parts, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(4, 3),
        "b64": torch.randn(5, dtype=torch.float64),
        "half": torch.randn(3, dtype=torch.float16),
        "bf": torch.randn(2, 2, dtype=torch.bfloat16),
        "step": torch.tensor(7, dtype=torch.int64),
        "ids": torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),  # not contiguous
        "mask": torch.tensor([True, False]),
        "codes": torch.tensor([1, 255], dtype=torch.uint8),
        "empty": torch.zeros(0),
        "é": torch.ones(1),
    }


@pytest.mark.parametrize("metadata", [None, {}, {"format": "x"}])
def test_streamed_bytes_equal_safetensors_save(metadata: dict[str, str] | None) -> None:
    """Input tried: ten dtypes, a 0-d, an empty, a transposed tensor and a non-ASCII name."""
    tensors = _tensors()
    expected = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    assert b"".join(bytes(p) for p in safetensors_parts(tensors, metadata)) == expected


def test_a_written_file_loads_back_and_its_hash_is_of_its_bytes(tmp_path: Path) -> None:
    tensors = _tensors()
    path, digest, size = write_safetensors(
        tmp_path / "c.safetensors", tensors, {"a": "1", "b": "2"}
    )
    data = path.read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (digest, size)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value)


def test_a_content_addressed_write_keeps_the_stored_file(tmp_path: Path) -> None:
    def blob(digest: str) -> Path:
        return tmp_path / "blobs" / digest[:2] / f"{digest}.safetensors"

    first, digest, _ = write_safetensors(blob, _tensors(), tmp_dir=tmp_path / "blobs")
    assert first == blob(digest)
    stamp = first.stat().st_mtime_ns
    again, same, _ = write_safetensors(blob, _tensors(), tmp_dir=tmp_path / "blobs")
    assert (again, same) == (first, digest)
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == [first.name]
