"""`first-gguf bench` on a tiny converted qwen2 (4 layers, f32): the result has every cell
(context x threads) and every strategy, with the spread, every repeat's figures and the
workers' peak resident set. Structure only: nothing here asserts a speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from first_gguf.bench import format_bench, live_worker, peak_rss_mb, run_bench, worker
from first_gguf.bench_files import fresh_copy, page_run
from first_gguf.cli import cli
from first_gguf.errors import FirstError

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STRATEGIES = {"full", "first", "mask", "pruned"}


@pytest.fixture(scope="module")
def tiny_first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tiny_ckpt
    from first_gguf.convert import convert_hf
    from first_gguf.format import make_identity_routers

    work = tmp_path_factory.mktemp("bench")
    model, hf_dir = tiny_ckpt.checkpoint_dir("qwen2", work)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    return convert_hf(hf_dir, work / "tiny.first.gguf", routers=make_identity_routers(n_layer, n_embd),
                      outtype="f32")


def test_every_cell_and_strategy(tiny_first: Path) -> None:
    res = run_bench(tiny_first, skip_count=1, repeats=2, ctx=[8, 24], decode_tokens=3, threads=[1, 2], stock=False)
    assert res["setup"]["ctx"] == [8, 24] and res["setup"]["threads"] == [1, 2]
    files = res["setup"]["files"]  # fresh copies of every file the strategies read
    assert res["setup"]["fresh_files"] and set(files) == {"model", "pruned"}
    assert {f["file"] for f in files.values()} == {"model.gguf", "pruned.gguf"}
    for f in files.values():
        assert all(f[k] is None or f[k] >= 1.0 for k in ("page_run_before", "page_run_after"))
    assert [(c["ctx"], c["threads"]) for c in res["cells"]] == [(8, 1), (8, 2), (24, 1), (24, 2)]
    for cell in res["cells"]:
        assert set(cell["strategies"]) == STRATEGIES
        for name, r in cell["strategies"].items():
            where = f"ctx {cell['ctx']}, {cell['threads']} threads, {name}"
            assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0, where
            assert r["peak_rss_mb"] > 0, where
            for key in ("decode", "prefill", "peak_rss"):
                lo, hi = r[f"{key}_spread"]
                assert 0 < lo <= hi, where
            assert len(r["runs"]) == 2 and all(run["peak_rss_mb"] > 0 for run in r["runs"]), where
        assert cell["strategies"]["full"]["decode_ratio"] == 1.0
        assert set(cell["pairs"]) == {"mask/pruned"} and cell["pairs"]["mask/pruned"]["decode_ratio"] > 0
        assert cell["strategies"]["mask"]["skipped_layers"] == [1]
        assert cell["strategies"]["pruned"]["skipped_layers"] == [1]
    table = format_bench(res)
    for c, t in [(8, 1), (8, 2), (24, 1), (24, 2)]:
        assert f"context {c}, {t} thread{'s' if t > 1 else ''}" in table
    assert "paired decode ratios: mask/pruned" in table
    assert "peak RSS MB" in table and all(name in table for name in STRATEGIES)
    json.dumps(res)  # the JSON output keeps all of it


def test_restored_prompt_decodes_as_its_prefill(tiny_first: Path, tmp_path: Path) -> None:
    """``--restore-prompt``: a worker that loads the prompt's saved KV cache and evaluates its last
    token again decodes the tokens a prefill of the whole prompt gives, under the same mask."""
    base = dict(path=str(tiny_first), prompt_tokens=24, decode_tokens=6, threads=1, mmap=True)
    for spec in (dict(name="full", engine="first", mode="full"),
                 dict(name="mask", engine="first", mode="mask", mask=[True, False, True, True]),
                 dict(name="plain", engine="plain")):
        job = dict(base, **spec)
        ref = worker(job)
        state = tmp_path / f"{spec['name']}.state"
        saved = worker(dict(job, state=str(state), save_state=True))
        got = worker(dict(job, state=str(state)))
        assert saved["prefill_tok_s"] > 0 and got["prefill_tok_s"] is None, spec["name"]
        assert len(got["tokens"]) == 7 and got["tokens"] == ref["tokens"], spec["name"]
        assert got["skipped_layers"] == ref["skipped_layers"] == ([1] if spec["name"] == "mask" else [])
    other = worker(dict(base, prompt_tokens=16, engine="plain", name="plain"))  # another prompt: refused
    with pytest.raises(RuntimeError, match="does not hold this prompt"):
        worker(dict(base, prompt_tokens=16, engine="plain", name="plain", state=str(tmp_path / "plain.state")))
    assert other["prefill_tok_s"] > 0


def test_live_worker_repeats_the_decode_a_fresh_worker_gives(tiny_first: Path, tmp_path: Path) -> None:
    """``--live``: a loaded worker answers every ``decode`` with a timed decode of the tokens a fresh
    worker decodes from the same prompt (the cache rewound to the prompt's end each time), also
    from a restored prompt, under a mask and on a plain model; an unknown command is refused."""
    import io

    base = dict(path=str(tiny_first), prompt_tokens=24, decode_tokens=6, threads=1, mmap=True)
    for spec in (dict(name="first", engine="first", mode="first"),
                 dict(name="mask", engine="first", mode="mask", mask=[True, False, True, True]),
                 dict(name="plain", engine="plain")):
        job = dict(base, **spec)
        ref = worker(job)
        state = tmp_path / f"{spec['name']}.state"
        worker(dict(job, state=str(state), save_state=True))
        for live_job in (job, dict(job, state=str(state))):
            out = io.StringIO()
            live_worker(live_job, commands=io.StringIO("decode\ndecode\ndecode\nstop\n"), answer=out)
            lines = [json.loads(x) for x in out.getvalue().splitlines()]
            ready, timed, end = lines[0], lines[1:-1], lines[-1]
            assert ready["skipped_layers"] == ref["skipped_layers"], spec["name"]
            assert (ready["prefill_tok_s"] is None) == ("state" in live_job), spec["name"]
            assert len(timed) == 3 and all(t["decode_tok_s"] > 0 for t in timed), spec["name"]
            assert end["tokens"] == ref["tokens"] and end["peak_rss_mb"] > 0, spec["name"]
    with pytest.raises(FirstError, match="unknown command"):
        live_worker(dict(base, name="plain", engine="plain"), commands=io.StringIO("go\n"), answer=io.StringIO())


def test_a_live_worker_that_dies_is_reported_by_name(tiny_first: Path, tmp_path: Path) -> None:
    from first_gguf.bench import _Live

    spec = dict(name="mask", engine="first", path=str(tiny_first), mode="mask", mask=[True, False, True, True],
                prompt_tokens=16, decode_tokens=3, threads=1, mmap=True)
    w = _Live(spec, None, tmp_path)
    try:
        assert w.ask("decode")["decode_tok_s"] > 0
        w._proc.kill()
        w._proc.wait()
        with pytest.raises(RuntimeError, match="bench worker mask failed"):
            w.ask("decode")
    finally:
        w.close()
    with pytest.raises(RuntimeError, match="bench worker gone failed"):
        _Live(dict(spec, name="gone", path=str(tmp_path / "missing.gguf")), None, tmp_path)


def test_live_run(tiny_first: Path) -> None:
    res = run_bench(tiny_first, skip_count=1, repeats=3, ctx=[8, 24], decode_tokens=3, threads=[1], stock=False,
                    strategies=["first", "mask"], live=True)
    assert res["setup"]["live"]
    for cell in res["cells"]:
        assert set(cell["strategies"]) == {"full", "first", "mask"}
        for name, r in cell["strategies"].items():
            assert len(r["runs"]) == 3 and r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0, name
            assert len({run["prefill_tok_s"] for run in r["runs"]}) == 1  # one prompt per loaded worker
        assert cell["strategies"]["mask"]["skipped_layers"] == [1]
    assert "alternating between loaded workers" in format_bench(res)


def test_restore_prompt_run(tiny_first: Path) -> None:
    res = run_bench(tiny_first, skip_count=1, repeats=2, ctx=[24], decode_tokens=3, threads=[1], stock=False,
                    strategies=["first", "mask"], restore_prompt=True)
    assert res["setup"]["restore_prompt"]
    assert set(res["setup"]["restored_prefill_tok_s"]["24"]) == {"full", "mask"}  # `first` needs its prompt
    (cell,) = res["cells"]
    for name in ("full", "mask"):
        assert cell["strategies"][name]["prefill_tok_s"] is None and cell["strategies"][name]["decode_tok_s"] > 0
    assert cell["strategies"]["first"]["prefill_tok_s"] > 0 and cell["strategies"]["first"]["prefill_ratio"] is None
    assert "restored" in format_bench(res)


def test_cli_json_and_bad_lists(tiny_first: Path) -> None:
    runner = CliRunner()
    args = ["bench", str(tiny_first), "--repeats", "1", "--decode-tokens", "2", "--skip-count", "1", "--no-stock",
            "--strategies", "mask"]
    out = runner.invoke(cli, [*args, "--ctx", "8,16", "--threads", "1", "--no-fresh-files", "--no-mmap", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert not res["setup"]["fresh_files"] and res["setup"]["files"]["model"]["file"] == tiny_first.name
    assert res["setup"]["mmap"] is False
    assert [(c["ctx"], c["threads"]) for c in res["cells"]] == [(8, 1), (16, 1)]
    assert all(set(c["strategies"]) == {"full", "mask"} for c in res["cells"])
    bad = runner.invoke(cli, [*args, "--ctx", "8,x"])
    assert bad.exit_code != 0 and "--ctx" in bad.output
    zero = runner.invoke(cli, [*args, "--threads", "0"])
    assert zero.exit_code != 0 and "thread count" in zero.output


def test_positive_lists() -> None:
    with pytest.raises(FirstError, match="context length"):
        run_bench(Path("unused.gguf"), ctx=[])  # refused before any file is read
    assert peak_rss_mb() > 0


def test_fresh_copy_and_page_run(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 70_000)  # over one 16 MiB chunk
    dst = fresh_copy(src, tmp_path / "dst.bin")
    assert dst.read_bytes() == src.read_bytes()
    run = page_run(dst)  # None without frame numbers (not Linux, or not root)
    assert run is None or run >= 1.0


def test_sigterm_removes_the_runs_file_copies(tiny_first: Path) -> None:
    """A bench stopped by SIGTERM (a service manager, `kill`) leaves no copies of the model behind."""
    import signal
    import subprocess
    import sys
    import time

    before = set(tiny_first.parent.iterdir())
    proc = subprocess.Popen([sys.executable, "-m", "first_gguf.cli", "bench", str(tiny_first), "--repeats", "500",
                             "--no-stock", "--threads", "1", "--ctx", "8", "--skip-count", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in set(tiny_first.parent.iterdir()) - before if p.name.startswith("tmp")]:
            assert proc.poll() is None and time.monotonic() < deadline, "the bench made no copies"
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert set(tiny_first.parent.iterdir()) == before


def test_thin_and_thinned_strategies(tiny_first: Path, tmp_path: Path) -> None:
    import numpy as np

    from first_gguf.format import read_thin, write_thin

    n_ff = 128  # the tiny qwen2's intermediate size (checked by write_thin against the file)
    thin = write_thin(tiny_first, {i: np.arange(0, n_ff, 2) for i in range(4)}, tmp_path / "thin.first.gguf")
    res = run_bench(thin, skip_count=1, repeats=1, ctx=[8], decode_tokens=3, threads=[1], stock=False)
    (cell,) = res["cells"]
    assert set(cell["strategies"]) == STRATEGIES | {"thin", "thinned"}
    assert set(res["setup"]["files"]) == {"model", "pruned", "thinned"}
    assert set(cell["pairs"]) == {"mask/pruned", "thin/thinned"}
    assert cell["strategies"]["thin"]["skipped_layers"] == [] and read_thin(thin).layers == (0, 1, 2, 3)
    assert "thin/thinned" in format_bench(res)
