"""Does a skip set still answer a pasted function stub? A chat check without HumanEval.

Through the chat template, a skipped layer can cost an answer by its form rather than its
logic: the model restates the stub it was given and closes the code block where the body
should start (it goes on copying the request, whose block ends there), or writes a stray
``python`` line under the fence. Raw completion never meets that decision, which is why it
prices layers differently from chat (docs/TRAINING.md, "How skipped layers lose chat
answers"). This script asks held-out ``stub`` requests (the built-in family: a standard-library
function's signature and docstring in a fenced block, under one of a few instructions; never
HumanEval), decodes each greedily under full and under each skip set, and sorts the answers
by their first code block: a body, an empty body (docstring only), a stray first line, or
code that does not parse.

    python examples/stub_answers.py measure qwen2.5-coder-0.5b-instruct stubs.jsonl \
        --sets "4;12;3,4;4,12;3,4,12" --n 48 --threads 2
    python examples/stub_answers.py report stubs.jsonl

Rows are appended per (set, request), so a stopped run resumes. About 2.5 s per answer of
at most 192 tokens for the 0.5B on two threads.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections import Counter
from pathlib import Path

KINDS = ("body", "empty", "stray", "unparsable")
_BLOCK = re.compile(r"```[a-zA-Z]*\n(.*?)(?:```|$)", re.S)


def kind(text: str) -> str:
    """How the answer's first code block ends up: ``body``, ``empty``, ``stray`` or ``unparsable``.

    A block cut by the token budget is read up to its last line that parses.
    """
    m = _BLOCK.search(text)
    code = m.group(1) if m else text
    first = code.lstrip("\n").split("\n", 1)[0].strip()
    if re.fullmatch(r"[A-Za-z]+", first) and not re.fullmatch(r"pass|return|break|continue", first):
        return "stray"  # e.g. "python" again under "```python"
    lines = code.split("\n")
    for cut in range(len(lines), max(len(lines) - 8, 0), -1):
        try:
            tree = ast.parse("\n".join(lines[:cut]))
            break
        except SyntaxError:
            continue
    else:
        return "unparsable"
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not fns:
        return "unparsable"
    body = [s for s in fns[0].body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return "body" if body else "empty"


def measure(model: str, out: Path, sets: list[str], n: int, max_new: int, threads: int | None, seed: int) -> None:
    from first_gguf.evaluation.items import LlamaTokenizer
    from first_gguf.prompts import Limits, builtin_examples
    from first_gguf.runtime import FirstModel
    from first_gguf.runtime.greedy import greedy
    from first_gguf.shipped import resolve_model

    llm = FirstModel(resolve_model(model), mode="full", n_ctx=160 + max_new + 8, n_threads=threads, verbose=False)
    examples = builtin_examples(LlamaTokenizer(llm), Limits(160, 2, 4096), ["stub"], n, seed=seed, split="heldout")
    done = set()
    if out.exists():
        done = {(r["set"], r["source"]) for r in map(json.loads, out.read_text().splitlines())}
    with out.open("a") as f:
        for s in [""] + [s for s in sets if s]:
            skip = sorted({int(x) for x in s.split(",")}) if s else []
            if skip:
                llm.configure(mode="mask", mask=[i not in skip for i in range(llm.n_layer)], prefill="full")
            else:
                llm.configure(mode="full")
            name = ",".join(map(str, skip)) or "full"
            for ex in examples:
                if (name, ex.source) in done:
                    continue
                g = greedy(llm, ex.prompt, max_new)
                f.write(json.dumps({"set": name, "source": ex.source, "kind": kind(g.text), "tokens": g.tokens,
                                    "text": g.text}) + "\n")
                f.flush()
            print(f"{name}: {len(examples)} answers", flush=True)
    llm.close()


def report(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    full = {r["source"]: r for r in rows if r["set"] == "full"}
    print(f"| set | requests | {' | '.join(KINDS)} | same tokens as full | lost a body full wrote |")
    print("|---|---|" + "---|" * (len(KINDS) + 2))
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name and r["source"] in full]
        counts = Counter(r["kind"] for r in mine)
        same = sum(r["tokens"] == full[r["source"]]["tokens"] for r in mine)
        lost = sum(r["kind"] != "body" and full[r["source"]]["kind"] == "body" for r in mine)
        print(f"| {name} | {len(mine)} | {' | '.join(str(counts[k]) for k in KINDS)} | {same} | {lost} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("model")
    m.add_argument("out", type=Path)
    m.add_argument("--sets", required=True, help="skip sets separated by ';', e.g. '4;3,4'")
    m.add_argument("--n", type=int, default=48, help="held-out stub requests")
    m.add_argument("--max-new", type=int, default=192)
    m.add_argument("--threads", type=int)
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report")
    r.add_argument("path", type=Path)
    a = ap.parse_args()
    if a.cmd == "measure":
        measure(a.model, a.out, a.sets.split(";"), a.n, a.max_new, a.threads, a.seed)
    else:
        report(a.path)


if __name__ == "__main__":
    main()
