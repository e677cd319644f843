"""Physically pruned GGUFs: renumbered blocks, cut block count, everything else byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

import ggufs
from first_gguf.errors import FirstError, FormatError
from first_gguf.format import parse_layers, prune_gguf, read_header


def test_prune_renumbers_and_copies_bytes(tmp_path: Path) -> None:
    base = ggufs.write_base(tmp_path / "b.gguf", n_layer=5)
    out = prune_gguf(base, [1, 3], tmp_path / "p.gguf")
    src, dst = read_header(base), read_header(out)
    assert dst.fields[f"{ggufs.ARCH}.block_count"].contents() == 3
    src_t = {t.name: t for t in src.tensors}
    for new, old in enumerate([0, 2, 4]):
        for t in (t for t in dst.tensors if t.name.startswith(f"blk.{new}.")):
            o = src_t[t.name.replace(f"blk.{new}.", f"blk.{old}.", 1)]
            assert (t.tensor_type, t.data.tobytes()) == (o.tensor_type, o.data.tobytes())
    assert not any(t.name.startswith("blk.3.") for t in dst.tensors)
    for name, f in src.fields.items():
        if name != f"{ggufs.ARCH}.block_count":
            assert dst.fields[name].contents() == f.contents(), name


def test_prune_drops_routers(tmp_path: Path) -> None:
    first = ggufs.write_first(tmp_path / "f.gguf")
    out = read_header(prune_gguf(first, [1], tmp_path / "p.gguf"))
    assert not any("first_router" in t.name for t in out.tensors)
    assert not any(k.startswith("first.") for k in out.fields)


def test_prune_bad_requests(tmp_path: Path) -> None:
    base = ggufs.write_base(tmp_path / "b.gguf", n_layer=3)
    with pytest.raises(FormatError, match=r"layers \[7\] out of range"):
        prune_gguf(base, [7], tmp_path / "p.gguf")
    with pytest.raises(FormatError, match="no model"):
        prune_gguf(base, [0, 1, 2], tmp_path / "p.gguf")
    with pytest.raises(FirstError, match="overwrite the input"):
        prune_gguf(base, [1], base)
    assert not (tmp_path / "p.gguf").exists()


def test_parse_layers() -> None:
    assert parse_layers("9,10,12-14") == [9, 10, 12, 13, 14]
    with pytest.raises(FormatError, match="not a layer"):
        parse_layers("9,x")
