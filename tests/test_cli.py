"""The `first-gguf` command line: every command's --help, the format commands end to end
on real files, and bad input as one clear line, a non-zero exit and untouched inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ggufs
from first_gguf.cli import cli

COMMANDS = sorted(cli.commands)


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_help_lists_every_command() -> None:
    code, out, _ = run("--help")
    assert code == 0
    for name in COMMANDS:
        assert name in out
    assert {"build", "models", "fetch", "attach", "inspect", "init-routers", "demo", "version"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name: str) -> None:
    code, out, _ = run(name, "--help")
    assert code == 0 and "Usage:" in out and "--help" in out


def test_console_script_runs() -> None:
    exe = Path(sys.executable).parent / "first-gguf"
    if not exe.exists():
        pytest.fail(f"{exe} missing: install the package (make setup)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "attach" in proc.stdout


def test_init_attach_inspect_round_trip(tiny_base: Path, tmp_path: Path) -> None:
    routers = tmp_path / "r.safetensors"
    code, out, err = run("init-routers", tiny_base, "-o", routers)
    assert code == 0, err
    out_gguf = tmp_path / "m.first.gguf"
    code, out, err = run("attach", tiny_base, routers, "-o", out_gguf)
    assert code == 0, err
    assert Path(out.strip()) == out_gguf
    code, out, err = run("inspect", out_gguf, "--json", "--require-first")
    assert code == 0, err
    info = json.loads(out)
    assert info["n_layer"] == ggufs.N_LAYER and info["first"]["hidden_size"] == 64
    assert info["first"]["protected_layers"] == [0, ggufs.N_LAYER - 1]
    code, out, _ = run("inspect", tiny_base)
    assert code == 0 and "not a FiRST-GGUF" in out


def _bad_inputs(tiny_base: Path, tmp: Path) -> dict[str, Path]:
    truncated = tmp / "truncated.gguf"
    truncated.write_bytes(tiny_base.read_bytes()[:1000])
    magic = tmp / "magic.gguf"
    magic.write_bytes(b"GGML" + tiny_base.read_bytes()[4:])
    return {"truncated": truncated, "wrong magic": magic}


@pytest.mark.parametrize("kind", ["truncated", "wrong magic"])
def test_corrupt_gguf_is_one_clear_line(kind: str, tiny_base: Path, tmp_path: Path) -> None:
    bad = _bad_inputs(tiny_base, tmp_path)[kind]
    before = bad.read_bytes()
    routers = tmp_path / "r.safetensors"
    assert run("init-routers", tiny_base, "-o", routers)[0] == 0
    for args in (("inspect", bad), ("attach", bad, routers, "-o", tmp_path / "o.gguf"),
                 ("init-routers", bad, "-o", tmp_path / "r2.safetensors")):
        code, out, err = run(*args)
        assert code != 0, args
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and bad.name in lines[0], (args, err)
        assert "Traceback" not in err + out
    assert bad.read_bytes() == before
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "r2.safetensors").exists()


def test_plain_gguf_given_to_a_first_only_command(tiny_base: Path) -> None:
    code, _, err = run("inspect", tiny_base, "--require-first")
    assert code != 0 and "not a FiRST-GGUF" in err and tiny_base.name in err


def test_routers_for_another_layer_count_are_refused(tmp_path: Path) -> None:
    base24 = ggufs.write_base(tmp_path / "b24.gguf", n_layer=4)
    base28 = ggufs.write_base(tmp_path / "b28.gguf", n_layer=6)
    routers = tmp_path / "r.safetensors"
    assert run("init-routers", base24, "-o", routers)[0] == 0
    sums = {p: ggufs.sha256(p) for p in (base28, routers)}
    code, _, err = run("attach", base28, routers, "-o", tmp_path / "o.gguf")
    assert code != 0
    assert "4 layers" in err and "6" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.gguf").exists()
    assert {p: ggufs.sha256(p) for p in sums} == sums


def test_existing_output_needs_force(tiny_base: Path, tmp_path: Path) -> None:
    routers = tmp_path / "r.safetensors"
    assert run("init-routers", tiny_base, "-o", routers)[0] == 0
    out = tmp_path / "taken.gguf"
    shutil.copy(tiny_base, out)
    before = out.read_bytes()
    code, _, err = run("attach", tiny_base, routers, "-o", out)
    assert code != 0 and "--force" in err
    assert out.read_bytes() == before
    assert run("attach", tiny_base, routers, "-o", out, "--force")[0] == 0
    assert out.read_bytes() != before


def test_unknown_model_is_one_line() -> None:
    code, _, err = run("fetch", "no-such-model", "--no-install")
    assert code != 0 and "no-such-model" in err and "qwen2.5-coder-0.5b-instruct" in err


def test_models_json_lists_the_zoo() -> None:
    code, out, _ = run("models", "--json")
    rows = json.loads(out)
    assert code == 0 and {r["name"] for r in rows} >= {"qwen2.5-coder-0.5b-instruct", "gemma-3-270m"}
    assert sum(r["default"] for r in rows) == 1


def test_version_reports_the_patched_runtime() -> None:
    code, out, err = run("version", "--json")
    assert code == 0, err
    info = json.loads(out)
    from first_gguf.constants import FIRST_VERSION

    assert info["format_version"] == FIRST_VERSION and info["up_to_date"] is True, info
