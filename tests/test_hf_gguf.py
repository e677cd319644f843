"""hf_gguf.one_parse_per_file: transformers' four reads of a GGUF share one parse."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

import ggufs
from first_gguf.hf_gguf import one_parse_per_file


def test_one_parse_per_file_shares_read_only_readers_and_restores_gguf(tmp_path):
    a_path, b_path = ggufs.write_base(tmp_path / "a.gguf"), ggufs.write_base(tmp_path / "b.gguf", n_layer=3)
    original = gguf.GGUFReader
    with one_parse_per_file():
        first = gguf.GGUFReader(a_path)
        assert isinstance(first, original) and gguf.GGUFReader(str(a_path)) is first
        assert gguf.GGUFReader(os.path.relpath(a_path)) is first  # the same file by another name
        assert gguf.GGUFReader(b_path) is not first  # another file: its own parse
        assert gguf.GGUFReader(a_path, "c") is not first  # a writable mapping is never shared
        stamp = a_path.stat()
        os.utime(a_path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
        assert gguf.GGUFReader(a_path) is not first  # a changed file is parsed again
    assert gguf.GGUFReader is original
    plain = original(a_path)
    assert list(plain.fields) == list(first.fields)
    assert [(t.name, t.tensor_type) for t in plain.tensors] == [(t.name, t.tensor_type) for t in first.tensors]
    assert all(np.array_equal(p.data, f.data) for p, f in zip(plain.tensors, first.tensors))


def test_one_parse_per_file_restores_gguf_after_an_error(tmp_path):
    original = gguf.GGUFReader
    with pytest.raises(FileNotFoundError), one_parse_per_file():
        gguf.GGUFReader(tmp_path / "missing.gguf")
    assert gguf.GGUFReader is original
