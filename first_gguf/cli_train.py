"""Training commands of ``first-gguf``: train, damage, fit-routers, heal, thin, vocab, tune (registered by ``cli``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli_args import PathArg, csv_values as _csv, gguf_path as _gguf
from .tune import TuneConfig


@click.command()
@click.argument("base")
@click.option("-o", "--output", required=True, help="Router file to write (.safetensors).")
@click.option("--data", multiple=True, help="Text/JSONL files or directories (repeatable).")
@click.option("--task", "tasks", multiple=True, help="Built-in family: code, instruct, prose, stub (repeatable).")
@click.option("--steps", default=None, type=int, help="Optimizer steps (default: the recipe's).")
@click.option("--examples", default=None, type=int, help="Training examples drawn (default: the recipe's).")
@click.option("--batch-size", default=None, type=int, help="Examples per optimizer step.")
@click.option("--gate", type=click.Choice(["soft", "concrete", "straight-through"]), default=None,
              help="Gate of the training forward (default: soft, docs/FORMAT.md's).")
@click.option("--lr", default=None, type=float)
@click.option("--lam", default=None, type=float, help="Skip-penalty weight (default 0.01, the paper's).")
@click.option("--target-skip", default=None, type=float, help="Also aim at this many skipped layers.")
@click.option("--no-distill", is_flag=True, help="Next-token loss on the data instead of KL to the full model.")
@click.option("--hidden-size", default=None, type=int)
@click.option("--threshold", default=None, type=float)
@click.option("--seed", default=0, show_default=True)
@click.option("--no-resume", is_flag=True, help="Ignore an existing checkpoint.")
@click.option("--lora", is_flag=True, help="Then LoRA-heal the frozen model with the routers fixed.")
@click.option("--lora-out", default=None, help="HF directory for the LoRA-merged model.")
@click.option("--threads", default=None, type=int)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def train(base: str, output: str, data: tuple[str, ...], tasks: tuple[str, ...], steps: int | None,
          examples: int | None, batch_size: int | None, gate: str | None, lr: float | None, lam: float | None,
          target_skip: float | None, no_distill: bool,
          hidden_size: int | None, threshold: float | None, seed: int, no_resume: bool, lora: bool,
          lora_out: str | None, threads: int | None, force: bool) -> None:
    """Train FiRST routers for BASE (HF dir, GGUF file or zoo name) on a frozen model."""
    from .train import train_routers

    opts = {"steps": steps, "examples": examples, "batch_size": batch_size, "gate": gate, "lr": lr, "lam": lam,
            "hidden_size": hidden_size, "threshold": threshold}
    out = train_routers(base, output, data=list(data) or None, tasks=list(tasks) or None,
                        target_skip=target_skip, distill=not no_distill, seed=seed, resume=not no_resume,
                        lora=lora, lora_out=lora_out, threads=threads, force=force,
                        **{k: v for k, v in opts.items() if v is not None})
    click.echo(out)



@click.command()
@click.argument("model")
@click.option("-o", "--output", type=PathArg, required=True, help="Label file (JSONL); an existing one resumes.")
@click.option("--per-family", default=64, show_default=True, help="Training prompts per family.")
@click.option("--families", default="code,instruct,prose", show_default=True)
@click.option("--max-prompt-tokens", default=160, show_default=True)
@click.option("--cont-tokens", default=32, show_default=True, help="Length of the full model's continuation.")
@click.option("--seed", default=1, show_default=True)
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
def damage(model: str, output: Path, per_family: int, families: str, max_prompt_tokens: int, cont_tokens: int,
           seed: int, threads: int | None) -> None:
    """Measure what skipping each layer alone costs (KL to full) on training prompts of MODEL.

    MODEL is a GGUF file or a zoo name. The labels are the target of `first-gguf fit-routers`.
    """
    from .damage import make_labels

    click.echo(make_labels(_gguf(model), output, families=_csv(families, str, "--families"),
                           n_per_family=per_family, max_prompt_tokens=max_prompt_tokens,
                           cont_tokens=cont_tokens, seed=seed, threads=threads))


@click.command("fit-routers")
@click.argument("model")
@click.argument("labels", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=PathArg, required=True, help="Router file to write (.safetensors).")
@click.option("--d-ref", default=None, type=float, help="Damage (KL) that maps to p = 0.5.")
@click.option("--epochs", default=None, type=int)
@click.option("--hidden-size", default=None, type=int)
@click.option("--weight-decay", default=None, type=float)
@click.option("--threshold", default=0.5, show_default=True, help="Threshold stored in the file.")
@click.option("--cv", default=0, show_default=True, help="First report K-fold cross-validation (0: none).")
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def fit_routers(model: str, labels: Path, output: Path, d_ref: float | None, epochs: int | None,
                hidden_size: int | None, weight_decay: float | None, threshold: float, cv: int, threads: int | None,
                force: bool) -> None:
    """Fit routers to damage LABELS of MODEL (GGUF file or zoo name): p_i follows each prompt's damage."""
    import dataclasses

    from .train.supervised import FitConfig, fit_routers as fit

    opts = {"d_ref": d_ref, "epochs": epochs, "hidden_size": hidden_size, "weight_decay": weight_decay}
    cfg = dataclasses.replace(FitConfig(), **{k: v for k, v in opts.items() if v is not None})
    from .log import logger

    result = fit(_gguf(model), labels, output, cfg, threshold=threshold, threads=threads, force=force,
                 log=logger("fit"), cv=cv)
    click.echo(result["out"])


@click.command()
@click.argument("model")
@click.option("--skip", required=True, help="The decode skip set to heal, e.g. 3,4,9 or 9-11.")
@click.option("-o", "--output", type=PathArg, required=True, help="Healing adapter GGUF to write.")
@click.option("--run-dir", type=PathArg, default=None, help="Checkpoint and adapter directory (default OUTPUT.run).")
@click.option("--examples", default=None, type=int, help="Training examples (built-in families, train split).")
@click.option("--epochs", default=None, type=int)
@click.option("--rank", default=None, type=int)
@click.option("--lr", default=None, type=float)
@click.option("--targets", default=None, help="Comma-separated module names (default: every linear map).")
@click.option("--layers", default=None, help="Layers that get adapters, e.g. 5,10 (default: the first kept "
              "layer after each skipped run).")
@click.option("--max-prompt-tokens", default=None, type=int, help="Longest prompt drawn (default 96).")
@click.option("--max-response-tokens", default=None, type=int)
@click.option("--families", default=None, help="Built-in families to train on, e.g. instruct or stub (default: code,instruct,prose).")
@click.option("--own", is_flag=True, help="Train along the model's own greedy continuations (written by the "
              "runtime, kept in the run directory) instead of the families' reference text.")
@click.option("--outtype", default="f16", show_default=True, help="f32, f16, bf16 or q8_0.")
@click.option("--threads", default=None, type=int, help="torch threads (default: all cores).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def heal(model: str, skip: str, output: Path, run_dir: Path | None, examples: int | None, epochs: int | None,
         rank: int | None, lr: float | None, targets: str | None, layers: str | None, max_prompt_tokens: int | None,
         max_response_tokens: int | None, families: str | None, own: bool, outtype: str, threads: int | None,
         force: bool) -> None:
    """Train a decode-only healing adapter for one skip set of MODEL (GGUF file or zoo name).

    `full` stays bit-identical: the runtime applies the adapter only while that set decodes
    (FirstModel(..., heal=FILE), `first-gguf eval --heal FILE`). An interrupted run resumes.
    """
    import dataclasses

    from .format import parse_layers
    from .train.heal import HealConfig, heal_gguf

    opts = {"examples": examples, "epochs": epochs, "rank": rank, "lr": lr, "max_response": max_response_tokens,
            "max_prompt": max_prompt_tokens, "own": own or None,
            "targets": tuple(_csv(targets, str, "--targets")) if targets else None,
            "layers": tuple(sorted(parse_layers(layers))) if layers else None,
            "families": _families(families)}
    cfg = dataclasses.replace(HealConfig(skip=tuple(sorted(parse_layers(skip)))),
                              **{k: v for k, v in opts.items() if v is not None})
    click.echo(heal_gguf(str(_gguf(model)), cfg, output, run_dir=run_dir, threads=threads, outtype=outtype,
                         force=force, source=" ".join(["first-gguf", "heal", *sys.argv[2:]])))


@click.command()
@click.argument("model")
@click.option("-o", "--output", type=PathArg, required=True, help="FiRST-GGUF to write, with thinned FFNs.")
@click.option("--width", required=True, help="Neurons each thinned FFN keeps (a multiple of the thin ffn_down's "
              "quantization block), or 'all' with --type: every neuron, requantized (no calibration).")
@click.option("--type", "qtype", default=None, metavar="TYPE",
              help="Requantize every thin tensor to this ggml type, e.g. IQ4_NL (default: the base's types).")
@click.option("--attn", is_flag=True, help="With --type: also copy each thin layer's attention weights (q, k, v, "
              "output) in that type, read by the same decode steps (first.version 4).")
@click.option("--layers", default="all", show_default=True, help="Layers to thin, e.g. 0,1,2 or 4-20.")
@click.option("--examples", default=120, show_default=True, help="Calibration examples (built-in families, train split).")
@click.option("--threads", default=None, type=int, help="torch threads (default: all cores).")
@click.option("--scores", type=PathArg, default=None,
              help="Neuron scores (npz, key contrib): read if it exists (no calibration), else written.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def thin(model: str, output: Path, width: str, qtype: str | None, attn: bool, layers: str, examples: int,
         threads: int | None, scores: Path | None, force: bool) -> None:
    """Add decode-only thinned FFNs to MODEL (a FiRST-GGUF or zoo name): docs/FORMAT.md section 7.

    Each listed layer keeps the WIDTH neurons that carry the most output on training prompts;
    the full FFNs stay, so the prompt and `full` are unchanged. With --type the thin copies
    are requantized (e.g. `--width all --type IQ4_NL`: the whole FFN in a type the CPU decodes faster),
    and with --attn the thin layers' attention weights too.
    """
    from .format import parse_layers
    from .shipped import resolve_model
    from .train.thin import thin_model

    if width != "all" and not width.isdigit():
        raise click.BadParameter(f"{width!r} is neither a neuron count nor 'all'", param_hint="--width")
    if attn and qtype is None:
        raise click.BadParameter("attention copies need --type (the copies' ggml type)", param_hint="--attn")
    chosen = None if layers == "all" else parse_layers(layers)
    click.echo(thin_model(resolve_model(model), output, None if width == "all" else int(width), layers=chosen,
                          examples=examples, threads=threads, scores=scores, force=force, qtype=qtype, attn=attn))


@click.command()
@click.argument("model")
@click.option("-o", "--output", type=PathArg, required=True,
              help="FiRST-GGUF to write, with a short output vocabulary.")
@click.option("--size", required=True, type=int, help="Most frequent tokens kept (every non-normal token is added).")
@click.option("--text", type=click.Path(path_type=Path), multiple=True,
              help="Directory or file of text to count (repeatable; default: the standard library, site-packages "
              "and /usr/share/doc).")
@click.option("--limit-mb", default=120.0, show_default=True, help="Megabytes of text counted at most.")
@click.option("--counts", type=PathArg, default=None,
              help="Token counts (npz, key counts): read if it exists (no counting), else written.")
@click.option("--type", "qtype", default=None, metavar="TYPE",
              help="Requantize the listed rows to this ggml type, e.g. IQ4_NL (default: the output matrix's bytes).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def vocab(model: str, output: Path, size: int, text: tuple[Path, ...], limit_mb: float, counts: Path | None,
          qtype: str | None, force: bool) -> None:
    """Add a decode-only short output vocabulary to MODEL (a FiRST-GGUF or zoo name): docs/FORMAT.md section 8.

    The model's tokenizer counts the tokens of local text (never HumanEval) and the SIZE most
    frequent are kept; the full output matrix stays, so the prompt and `full` are unchanged.
    """
    from .shipped import resolve_model
    from .train.vocab import vocab_model

    click.echo(vocab_model(resolve_model(model), output, size, text=list(text) or None,
                           limit_bytes=int(limit_mb * 1e6), counts=counts, force=force, qtype=qtype))


def _families(value: str | None) -> tuple[str, ...] | None:
    from .prompts import KNOWN_FAMILIES

    names = _csv(value, str, "--families")
    bad = [n for n in names or () if n not in KNOWN_FAMILIES]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: not a built-in family ({', '.join(KNOWN_FAMILIES)})",
                                 param_hint="--families")
    return names


_TUNE = TuneConfig()  # tune's defaults, shown by --help


@click.command()
@click.argument("model")
@click.option("-o", "--output", type=PathArg, required=True,
              help="FiRST-GGUF to write with the chosen points; work files and every measurement in OUTPUT.tune/.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Damage labels of MODEL (`first-gguf damage`; default: measured into OUTPUT.tune/).")
@click.option("--max-skip", default=_TUNE.max_skip, show_default=True, help="Candidates skip up to this many layers.")
@click.option("--thresholds", default=",".join(f"{t:g}" for t in _TUNE.thresholds), show_default=True,
              help="Routed candidates: a FiRST-GGUF's own routers at these thresholds ('none': no routed candidates).")
@click.option("--warmup", default=_TUNE.warmup, show_default=True,
              help="Skipping candidates are also measured after this many full-depth decode steps (0: not).")
@click.option("--copies", default=_TUNE.copies, show_default=True, metavar="TYPE",
              help="ggml type of the decode-only FFN copies, or 'none'.")
@click.option("--vocab-size", default=_TUNE.vocab_size, show_default=True, help="Short output vocabulary size (0: none).")
@click.option("--text-mb", default=_TUNE.text_mb, show_default=True, help="Megabytes of local text counted for it.")
@click.option("--max-kl", default=_TUNE.max_kl, show_default=True,
              help="The default point: the fastest whose damage (KL to full on held-out prompts, plus the "
                   "probability full puts on tokens a short vocabulary cannot write) is within this.")
@click.option("--min-gain", default=_TUNE.min_gain, show_default=True,
              help="A point decodes this much faster (relative) than the less damaging point before it.")
@click.option("--max-point-kl", default=_TUNE.max_point_kl, show_default=True,
              help="No point damages more than this (faster candidates past it are not offered).")
@click.option("--label-prompts", default=_TUNE.label_prompts, show_default=True, help="Damage labels: training prompts per family.")
@click.option("--eval-prompts", default=_TUNE.eval_prompts, show_default=True, help="Quality: held-out prompts per family.")
@click.option("--repeats", default=_TUNE.repeats, show_default=True, help="Speed: interleaved repeats.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def tune(model: str, output: Path, labels: Path | None, max_skip: int, thresholds: str, warmup: int, copies: str,
         vocab_size: int, text_mb: float, max_kl: float, min_gain: float, max_point_kl: float, label_prompts: int,
         eval_prompts: int, repeats: int, threads: int | None, as_json: bool, force: bool) -> None:
    """Give MODEL (a GGUF or FiRST-GGUF, or zoo name) operating points chosen by measurement.

    Skip sets follow measured damage; every candidate (skip sets, decode-only FFN copies, short
    output vocabulary, a warm-up of full-depth decode steps) is measured against full for quality
    and decode speed on this machine; the candidates nothing beats on both become points, the
    fastest within --max-kl the default.
    """
    import json
    from dataclasses import replace

    from .log import logger
    from .shipped import resolve_model
    from .tune import table, tune as run

    levels = () if thresholds.strip().lower() == "none" else _csv(thresholds, float, "--thresholds") or ()
    cfg = replace(_TUNE, max_skip=max_skip, thresholds=levels, warmup=warmup,
                  copies=None if copies.lower() == "none" else copies.upper(), vocab_size=vocab_size, text_mb=text_mb,
                  max_kl=max_kl, min_gain=min_gain, max_point_kl=max_point_kl, label_prompts=label_prompts,
                  eval_prompts=eval_prompts, repeats=repeats)
    report = run(resolve_model(model), output, cfg, labels=labels, threads=threads, force=force, log=logger("tune"))
    click.echo(json.dumps(report, indent=1) if as_json else f"{table(report)}\nwrote {output}")
