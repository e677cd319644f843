"""Thin every FFN instead of skipping whole layers: quality per byte of decode, measured.

On the 0.5B a decode step streams about 391 MB (the 24 blocks, 247 MB, and the output
matrix, 145 MB); one layer is 2.6% of it, and 87.5% of a layer is its FFN. This script
keeps, in every layer, the FFN neurons that carry the most output on training prompts, and
writes a plain GGUF with a smaller ``feed_forward_length`` that stock llama.cpp reads:

- ``scores``: per layer and neuron j, calibrated on 40 prompts per family of the shipped
  damage labels (prompt and full's continuation; never HumanEval), each prompt weighted
  alike: ``contrib`` = mean over tokens of z_j^2 * |W_down[:, j]|^2 (z = act(gate) * up),
  ``griffin`` = the sum over tokens of z_j^2 with each token's z scaled to unit norm
  (GRIFFIN's prompt statistic, here averaged over prompts: a static selection).
- ``kl``: teacher-forced KL to full on the first 12 label rows of each family (held out from
  the calibration), thinning decode only (the prompt's KV cache exact, as FiRST runs) and
  thinning everything (what the written GGUF does), for several neuron counts.
- ``write``: the thinned GGUF. ffn_gate / ffn_up rows are neurons and are copied as their
  quantized bytes; ffn_down is dequantized, its columns selected and quantized again to its
  own type with ggml's quantizer (the library llama-cpp-python ships), as ``first-gguf thin``
  does for its decode-only stand-ins (``first_gguf.format.thin_write``).

    python examples/ffn_slim.py scores -o scores.npz
    python examples/ffn_slim.py kl scores.npz --keep 4096,3840,3584
    python examples/ffn_slim.py write scores.npz --keep 3840 -o slim-3840.gguf
    python examples/ffn_slim.py speed "$(first-gguf fetch qwen2.5-coder-0.5b-instruct)" slim-3840.gguf pruned-3.gguf
    first-gguf attach slim-3840.gguf first_gguf/data/qwen2.5-coder-0.5b-instruct.routers.safetensors -o slim-3840.first.gguf
    first-gguf eval slim-3840.first.gguf -o eval/slim-3840 --tasks humaneval-chat --limit 50 --strategies full

Figures and what they mean for FiRST: docs/TRAINING.md, "Thinning FFNs instead of skipping layers".
"""

from __future__ import annotations

import argparse
import copy
import types
from pathlib import Path

import numpy as np

MODEL = "qwen2.5-coder-0.5b-instruct"
FAMILIES = ("code", "instruct", "prose")
N_TEST, N_CAL = 12, 40


def label_rows() -> tuple[list[dict], list[dict]]:
    """(held-out test rows, calibration rows) of the shipped damage labels."""
    from first_gguf import damage

    _, rows = damage.read_labels(Path(__file__).parents[1] / "first_gguf" / "data" / f"{MODEL}.damage.jsonl")
    test, cal = [], []
    for fam in FAMILIES:
        mine = [r for r in rows if r["family"] == fam]
        test += mine[:N_TEST]
        cal += mine[N_TEST:N_TEST + N_CAL]
    return test, cal


class Thinned:
    """The torch model with every layer's MLP either recording neuron statistics or masked."""

    def __init__(self, threads: int):
        import torch

        from first_gguf.train.base import load_base, set_threads

        set_threads(threads)
        torch.set_grad_enabled(False)
        self.torch = torch
        self.model, _ = load_base(MODEL)
        self.layers = self.model.model.layers
        self.record: dict[str, torch.Tensor] | None = None
        self.keep: torch.Tensor | None = None  # [n_layer, n_ff] 0/1
        self._full_rows: list[dict] | None = None  # the rows self._cache holds full's results for
        self._cache: list[tuple] = []
        self.down_norm = torch.stack([l.mlp.down_proj.weight.pow(2).sum(0) for l in self.layers])
        for i, layer in enumerate(self.layers):
            layer.mlp.forward = self._mlp(i, layer.mlp)

    def _mlp(self, i: int, mlp):
        def forward(x):
            z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            if self.record is not None:
                zz = z[0]
                g = (zz / zz.norm(dim=-1, keepdim=True).clamp_min(1e-6)).pow(2).sum(0)
                c = zz.pow(2).mean(0) * self.down_norm[i]
                self.record["griffin"][i] += g / g.sum()
                self.record["contrib"][i] += c / c.sum()
            elif self.keep is not None:
                z = z * self.keep[i]
            return mlp.down_proj(z)
        return forward

    def scores(self, rows: list[dict]) -> dict[str, np.ndarray]:
        shape = self.down_norm.shape
        self.record = {"griffin": self.torch.zeros(shape), "contrib": self.torch.zeros(shape)}
        for r in rows:
            self.model(self.torch.tensor([r["prompt"] + r["cont"]]))
        out, self.record = {k: v.numpy() for k, v in self.record.items()}, None
        return out

    def _full(self, rows: list[dict]) -> list[tuple]:
        """Per row (prompt, continuation, the prompt's KV cache, full's log-probs): computed once."""
        if self._full_rows is not rows:
            t, self._cache = self.torch, []
            for r in rows:
                p, c = t.tensor([r["prompt"]]), t.tensor([r["cont"]])
                kv = self.model(p, use_cache=True).past_key_values
                ref = self.model(c, past_key_values=copy.deepcopy(kv), use_cache=True).logits[0]
                self._cache.append((p, c, kv, ref.log_softmax(-1)))
            self._full_rows = rows
        return self._cache

    def kl(self, rows: list[dict], keep: np.ndarray, decode_only: bool) -> float:
        """Mean teacher-forced KL(full || thinned) over the rows' continuation tokens."""
        t, vals = self.torch, []
        for p, c, kv, ref in self._full(rows):
            self.keep = t.from_numpy(keep.astype(np.float32))
            try:
                if decode_only:
                    got = self.model(c, past_key_values=copy.deepcopy(kv), use_cache=True).logits[0]
                else:
                    got = self.model(t.cat([p, c], 1)).logits[0, p.shape[1]:]
            finally:
                self.keep = None
            got = got.log_softmax(-1)
            vals.append(float((ref.exp() * (ref - got)).sum(-1).mean()))
        return float(np.mean(vals))


def top_neurons(scores: np.ndarray, keep: int) -> list[np.ndarray]:
    """Per layer, the ``keep`` best neurons in their original order."""
    from first_gguf.format.thin import top_neurons as top

    return [top(s, keep) for s in scores]


def write_slim(scores: np.ndarray, keep: int, out: Path) -> None:
    from first_gguf import models
    from first_gguf.format import read_header
    from first_gguf.format.reader import model_dims
    from first_gguf.format.thin_write import select_columns
    from first_gguf.format.writer import copied_fields, gguf_writer, write_tensors

    base = models.fetch(MODEL)
    reader = read_header(base)
    arch, _, _ = model_dims(reader, str(base))
    chosen, tensors = top_neurons(scores, keep), []
    for t in reader.tensors:
        part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if part in ("ffn_gate", "ffn_up", "ffn_down"):
            idx = chosen[int(t.name.split(".")[1])]
            if part == "ffn_down":  # rows are outputs, columns neurons: select, then quantize again
                data = select_columns(t, idx)
            else:  # rows are neurons, each quantized on its own
                data = np.ascontiguousarray(t.data[idx])
            tensors.append((t.name, types.SimpleNamespace(data=data, tensor_type=t.tensor_type)))
        else:
            tensors.append((t.name, t))
    with gguf_writer(reader, arch, out) as w:
        for f in copied_fields(reader):
            if f.name == f"{arch}.feed_forward_length":
                w.add_uint32(f.name, keep)
            else:
                w.copy_field(reader, f)
        write_tensors(w, reader, tensors)


_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=512, n_threads=int(sys.argv[2]), n_batch=512, verbose=False)
prompt = llm.tokenize(("def f(x):\n    return x * 2\n" * 20).encode())[:128]
llm.eval(prompt)
tok = prompt[-1]
t = time.perf_counter()
for _ in range(64):
    llm.eval([tok])
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
print(json.dumps(64 / (time.perf_counter() - t)))
"""


def speed(files: list[Path], threads: int, repeats: int) -> None:
    """Decode tok/s (128-token prompt, 64 greedy steps) of each file, interleaved, one process per
    run, every file read from a copy written at the start (a long-cached file whose pages are
    scattered decodes slower: docs/SPEED.md); ratios to the first file, paired by repeat."""
    import shutil
    import statistics
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(dir=Path.home() / ".cache" / "first-gguf") as tmp:
        copies = [Path(tmp) / f"{i}-{f.name}" for i, f in enumerate(files)]
        for f, c in zip(files, copies):
            shutil.copyfile(f, c)
        runs: list[list[float]] = [[] for _ in files]
        for _ in range(repeats):
            for got, c in zip(runs, copies):
                out = subprocess.run([sys.executable, "-c", _WORKER, str(c), str(threads)],
                                     capture_output=True, text=True, check=True)
                got.append(float(out.stdout.split()[-1]))
    for f, got in zip(files, runs):
        ratios = [a / b for a, b in zip(got, runs[0])]
        print(f"{f.name}: {statistics.median(got):.1f} tok/s, x {files[0].name} {statistics.median(ratios):.3f} "
              f"(spread {min(ratios):.3f}-{max(ratios):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("scores", help="calibrate neuron scores")
    sc.add_argument("-o", "--out", type=Path, required=True)
    kl = sub.add_parser("kl", help="teacher-forced KL of thinned FFNs on held-out label rows")
    kl.add_argument("scores", type=Path)
    kl.add_argument("--keep", default="4096,3840,3584")
    wr = sub.add_parser("write", help="write the thinned GGUF")
    wr.add_argument("scores", type=Path)
    wr.add_argument("--keep", type=int, required=True)
    wr.add_argument("--criterion", default="contrib", choices=("contrib", "griffin"))
    wr.add_argument("-o", "--out", type=Path, required=True)
    sp = sub.add_parser("speed", help="interleaved decode speed of GGUF files, ratios to the first")
    sp.add_argument("files", type=Path, nargs="+")
    sp.add_argument("--repeats", type=int, default=7)
    for p in (sc, kl, sp):
        p.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.cmd == "speed":
        speed(a.files, a.threads, a.repeats)
        return
    if a.cmd == "write":
        if a.out.exists():
            raise SystemExit(f"{a.out}: exists; not overwritten")
        write_slim(np.load(a.scores)[a.criterion], a.keep, a.out)
        print(a.out)
        return
    test, cal = label_rows()
    model = Thinned(a.threads)
    if a.cmd == "scores":
        np.savez(a.out, **model.scores(cal))
        print(a.out)
        return
    scores = np.load(a.scores)
    for keep in (int(k) for k in a.keep.split(",")):
        cells = [f"keep {keep}/{scores['contrib'].shape[1]}"]
        for crit in ("griffin", "contrib"):
            mask = np.zeros(scores[crit].shape)
            for i, idx in enumerate(top_neurons(scores[crit], keep)):
                mask[i, idx] = 1
            cells.append(f"{crit}: decode-only {model.kl(test, mask, True):.4f}, "
                         f"everything {model.kl(test, mask, False):.4f}")
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
