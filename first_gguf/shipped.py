"""What the package ships for zoo models, and the FiRST-GGUF made from it.

``first_gguf/data/`` holds, per zoo model, the trained routers (``<name>.routers.safetensors``),
the named operating points (``<name>.points.json``, docs/FORMAT.md section 2), the damage
labels (``<name>.damage.jsonl``), the healing adapters the points name and the neurons of its
thinned FFNs (``<name>.thin.npz``: ``layer_<i>`` the kept neurons of layer i, ``source`` how they
were chosen, ``type`` the ggml type they are requantized to, if any, ``attn`` true when the thin
layers also carry attention copies; docs/FORMAT.md section 7)
and its short output vocabulary (``<name>.vocab.npz``:
``tokens`` the listed token ids, ``source`` how they were chosen, ``type`` the ggml type their
rows are requantized to, if any; section 8). ``first_gguf_path``
turns a zoo model into a FiRST-GGUF: the base with its committed routers, else the untrained
recipe routers (which keep every layer), its thinned FFNs, short vocabulary and points when
there are any; assembled once into the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FirstError
from .log import logger
from .models import DEFAULT_MODEL, MODELS, fetch
from .paths import cache_dir

if TYPE_CHECKING:
    from .format import RouterSet

DATA = Path(__file__).parent / "data"

_log = logger("zoo")


def shipped_routers_path(name: str) -> Path | None:
    """The file of the trained routers committed with the package for zoo model ``name``, if any."""
    path = DATA / f"{name}.routers.safetensors"
    return path if path.is_file() else None


def shipped_points_path(name: str) -> Path | None:
    """The named operating points (JSON, docs/FORMAT.md section 2) committed for zoo model ``name``, if any."""
    path = DATA / f"{name}.points.json"
    return path if path.is_file() else None


def shipped_labels_path(name: str) -> Path | None:
    """The damage labels (``first-gguf damage``) committed with the package for zoo model ``name``, if any."""
    path = DATA / f"{name}.damage.jsonl"
    return path if path.is_file() else None


def shipped_thin(name: str) -> tuple[dict[int, list[int]], str, str | None, bool] | None:
    """The kept neurons per layer of zoo model ``name``'s thinned FFNs, their source, the type
    they are requantized to (None: the base's) and whether attention copies come with them, if committed."""
    import numpy as np

    path = DATA / f"{name}.thin.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        layers = sorted(int(k.split("_")[1]) for k in z.files if k.startswith("layer_"))
        qtype = str(z["type"]) if "type" in z.files else None
        attn = bool(z["attn"]) if "attn" in z.files else False
        return {i: [int(j) for j in z[f"layer_{i}"]] for i in layers}, str(z["source"]), qtype, attn


def shipped_vocab(name: str) -> tuple[list[int], str, str | None] | None:
    """The short output vocabulary of zoo model ``name`` (token ids), its source and the type its
    rows are requantized to (None: the output matrix's bytes), if committed."""
    import numpy as np

    path = DATA / f"{name}.vocab.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        qtype = str(z["type"]) if "type" in z.files else None
        return [int(t) for t in z["tokens"]], str(z["source"]), qtype


def shipped_routers(name: str) -> RouterSet | None:
    """Trained routers committed with the package for zoo model ``name``, if any."""
    from .format import load_router_file

    path = shipped_routers_path(name)
    return load_router_file(path) if path else None


def first_gguf_path(name: str, seed: int = 0) -> Path:
    """Zoo model ``name`` with its committed routers (else the recipe's, ``seed``) and operating
    points (if committed) as a FiRST-GGUF.

    The file is ``<cache>/demo/<name>.first.gguf``, rebuilt when the base is newer or its
    routers or points differ. A W1 committed as F16 stays F16 in the GGUF.
    """
    from . import format as fmt

    base = fetch(name)
    routers, shipped = shipped_routers(name), shipped_routers_path(name)
    if routers is None:
        info = fmt.inspect_gguf(base)
        routers = fmt.make_identity_routers(info["n_layer"], info["n_embd"], seed=seed)
    thin, vocab = shipped_thin(name), shipped_vocab(name)
    points_file = shipped_points_path(name)
    points = fmt.load_points(points_file, routers.n_layer, routers.protected_layers,
                             thin_layers=sorted(thin[0]) if thin else None,
                             has_vocab=vocab is not None) if points_file else fmt.Points()
    w1 = fmt.stored_w1_dtype(shipped) if shipped else "f32"
    out = cache_dir() / "demo" / f"{name}.first.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    _place_heals(points, out.parent)
    if (out.is_file() and out.stat().st_mtime >= base.stat().st_mtime
            and _same_parts(out, routers, points, thin, vocab) and fmt.gguf_w1_dtype(out) == w1):
        _log(f"reusing {out}")
        return out
    _log(f"attaching the routers{' and operating points' if len(points) else ''} of {name} to {base.name}")
    if thin is None and vocab is None:
        return fmt.attach_routers(base, routers, out, force=True, w1_dtype=w1, points=points)
    # routers, then the thinned FFNs and the short vocabulary, then the points (which may name them)
    steps = []
    if thin is not None:
        steps.append((f"the FFN stand-ins (thinned or requantized) of {len(thin[0])} layers"
                      + (" and their attention copies" if thin[3] else ""),
                      lambda src, dst: fmt.write_thin(src, thin[0], dst, source=thin[1], force=True, qtype=thin[2],
                                                      attn=thin[3])))
    if vocab is not None:
        steps.append((f"a short output vocabulary of {len(vocab[0])} tokens",
                      lambda src, dst: fmt.write_vocab(src, vocab[0], dst, source=vocab[1], force=True,
                                                       qtype=vocab[2])))
    step = fmt.attach_routers(base, routers, out.with_name(out.name + ".step0"), force=True, w1_dtype=w1)
    for k, (what, write) in enumerate(steps, 1):
        _log(f"adding {what}")
        try:
            nxt = write(step, out.with_name(out.name + f".step{k}"))
        finally:
            step.unlink()
        step = nxt
    try:
        return fmt.stamp_points(step, points, out, force=True)
    finally:
        step.unlink()


def _place_heals(points, directory: Path) -> None:
    """Copy the healing adapters the points name from the package data beside the FiRST-GGUF."""
    import shutil

    for point in points:
        if point.heal is None:
            continue
        src, dst = DATA / point.heal, directory / point.heal
        if not src.is_file():
            raise FirstError(f"{src}: the operating point {point.name!r} names this healing adapter; it is missing")
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
            dst.with_name(dst.name + ".tmp").replace(dst)


def resolve_model(model: str | Path | None) -> Path:
    """The GGUF a MODEL argument names: a file, a zoo name (its FiRST-GGUF) or None (the default's).

    Raises:
        FirstError: neither an existing file nor a zoo name.
    """
    name = str(model) if model is not None else DEFAULT_MODEL
    path = Path(name)
    if path.exists():
        return path
    if name not in MODELS:
        raise FirstError(f"{name}: no such file, and not a zoo model ({', '.join(MODELS)})")
    return first_gguf_path(name)


def _same_parts(path: Path, routers: RouterSet, points,
                thin: tuple[dict[int, list[int]], str, str | None, bool] | None,
                vocab: tuple[list[int], str, str | None] | None) -> bool:
    """Whether the FiRST-GGUF at ``path`` carries exactly these routers, points, thinned FFNs and
    short vocabulary (read once, without the byte comparisons of copied rows: the file is our own output)."""
    from .format import read_first_parts

    try:
        parts = read_first_parts(path, deep=False)
    except FirstError:
        return False
    return (_same_routers(parts.routers, routers) and parts.points == points and _same_thin(parts.thin, thin)
            and _same_vocab(parts.vocab, vocab))


def _same_thin(have, thin: tuple[dict[int, list[int]], str, str | None, bool] | None) -> bool:
    if thin is None or have is None:
        return thin is None and have is None
    return (have.source == thin[1] and have.qtype == thin[2] and have.attn == thin[3]
            and {i: list(have.neurons_of(i)) for i in have.layers} == thin[0])


def _same_vocab(have, vocab: tuple[list[int], str, str | None] | None) -> bool:
    if vocab is None or have is None:
        return vocab is None and have is None
    return have.source == vocab[1] and have.qtype == vocab[2] and list(have.tokens) == sorted(vocab[0])


def _same_routers(have: RouterSet, routers: RouterSet) -> bool:
    import numpy as np

    a, b = have.metadata(), routers.metadata()
    # the GGUF keeps floats (norm_eps, threshold) as float32: compare them at that precision
    same = a.keys() == b.keys() and all(
        np.float32(a[k]) == np.float32(b[k]) if isinstance(b[k], float) else a[k] == b[k] for k in b)
    return same and all(
        np.array_equal(have.tensors[i][role], arr) for i, layer in routers.tensors.items() for role, arr in layer.items())


def open_draft(draft: str | Path | None, point: str | None, max_tokens: int, **kwargs):
    """The ``FirstDraft`` of ``--draft`` (a file or zoo name) at ``point`` (its default when None), or None."""
    if draft is None:
        if point is not None:
            raise FirstError("--draft-point needs --draft")
        return None
    from .runtime.speculative import FirstDraft

    return FirstDraft.open(resolve_model(draft), point=point, max_tokens=max_tokens, **kwargs)
