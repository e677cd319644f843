"""Built-in prompts: training and evaluation examples made from the standard library (no torch, no hub).

Three default families (``FAMILIES``), from what every Python installation has: ``code`` (a
window of a standard-library ``.py`` file, from a random line: the code before, then its
continuation), ``instruct`` (a chat-formatted request to write a standard-library function from
its signature and docstring, with the tokenizer's chat template; the response is that
function's source in a fenced block) and ``prose`` (English documentation: the language
reference text of ``pydoc_data.topics`` and long module docstrings). One more family is drawn
only when asked for by name (``EXTRA_FAMILIES``): ``stub`` (a chat-formatted request to complete
a function stub pasted in a fenced block, its signature and docstring without the body, under
one of a few instructions; the response restates the stub and goes on with the body, so it
holds the point where an answer stops copying the request and starts its own code).

They are split into train and held-out by file (``is_heldout``: sha256 of the file's path
relative to the standard library, or of the pydoc topic name), so held-out prompts never
share a file with training ones. HumanEval is never used. A tokenizer is anything with the
slice of the HF tokenizer interface used here (``__call__``, ``apply_chat_template``,
``chat_template``). User data files are ``train/data.py``'s.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import FirstError

FAMILIES = ("code", "instruct", "prose")  # the default set
EXTRA_FAMILIES = ("stub",)  # drawn only when named
KNOWN_FAMILIES = FAMILIES + EXTRA_FAMILIES
# The ``stub`` family's requests: one drawn per example (none is a benchmark's wording).
STUB_REQUESTS = (
    "Complete the following Python function.\n\n```python\n{stub}\n```",
    "Please implement this function:\n```python\n{stub}\n```",
    "Fill in the body of this function.\n\n```python\n{stub}\n```",
    "Here is a function stub. Write its implementation.\n\n```python\n{stub}\n```",
)
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10
MIN_RESPONSE = 2  # the first response token comes from the full-depth prompt: one more is needed to train
# Standard-library directories that are not library code (tests, vendored packages, caches).
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo"})
MIN_DOCSTRING = 60
MIN_MODULE_DOC = 600
_DOCSTRING_START = re.compile(r'(\s*#[^\n]*\n)*\s*[rRuU]?("""|\'\'\')')
MAX_PASSES = 4  # passes over a family's files to find n examples


class DataError(FirstError):
    """A data file cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    prompt: token ids run at full depth (what the routers read); response: the ids after it.
    family: ``code``, ``instruct``, ``prose`` or ``data`` (user files); source: where it came from.
    """

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    family: str
    source: str


@dataclass(frozen=True)
class Limits:
    """Token budgets: prompts up to ``max_prompt``, responses up to ``max_response``, and the model's context."""

    max_prompt: int
    max_response: int
    context: int

    def check(self) -> None:
        if self.max_prompt < 1 or self.max_response < MIN_RESPONSE:
            raise FirstError(f"max_prompt_tokens must be >= 1 and max_response_tokens >= {MIN_RESPONSE}, got "
                             f"{self.max_prompt} and {self.max_response}")
        if self.max_prompt + self.max_response > self.context:
            raise FirstError(f"max_prompt_tokens + max_response_tokens = {self.max_prompt + self.max_response} "
                             f"exceeds the model's context of {self.context} tokens")


def is_heldout(key: str) -> bool:
    """True for the ~10% of built-in files (by name) that are held out of training."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 100 < HELDOUT_PERCENT


def builtin_examples(tokenizer, limits: Limits, tasks: Sequence[str], per_family: int, seed: int = 0,
                     split: str = "train") -> list[Example]:
    """Up to ``per_family`` examples of each built-in family in ``tasks``, drawn with ``seed`` from ``split``.

    Raises:
        FirstError: an unknown split or family, limits that do not fit; DataError: a family
            has no example that fits the limits.
    """
    check_request(tasks, split)
    limits.check()
    examples: list[Example] = []
    for task in tasks:
        found = family_examples(task, tokenizer, limits, per_family, seed, split)
        if not found:
            raise DataError(f"built-in family {task!r}: no {split} example fits max_prompt_tokens="
                            f"{limits.max_prompt} and max_response_tokens={limits.max_response}")
        examples += found
    return examples


def check_request(tasks: Sequence[str], split: str) -> None:
    """Raise FirstError for an unknown split or family."""
    if split not in SPLITS:
        raise FirstError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    for task in tasks:
        if task not in KNOWN_FAMILIES:
            raise FirstError(f"unknown task family {task!r}; built-in families are {', '.join(KNOWN_FAMILIES)}")


def rng_for(seed: int, family: str, split: str) -> np.random.Generator:
    """The generator of one family's draws (a fixed function of seed, family and split)."""
    return np.random.default_rng([seed, zlib.crc32(family.encode()), SPLITS.index(split)])


# --- tokenization ----------------------------------------------------------------------------

def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. BOS), which prompts start with."""
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    bare = encode(tokenizer, "x")
    n = len(full) - len(bare)
    return full[:n] if n > 0 and full[n:] == bare else []

# --- built-in families ------------------------------------------------------------------------

def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str) -> list[tuple[str, Path]]:
    """(path relative to the standard library, path) of its library .py files in ``split``, sorted."""
    root = stdlib_dir()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS.isdisjoint(path.relative_to(root).parts[:-1]) and is_heldout(rel) == (split == "heldout"):
            files.append((rel, path))
    return files


def family_examples(family: str, tokenizer, limits: Limits, n: int, seed: int, split: str) -> list[Example]:
    """Up to ``n`` examples of one built-in family from ``split``, drawn with ``seed``."""
    rng = rng_for(seed, family, split)
    make = {"code": _code_examples, "instruct": _instruct_examples, "prose": _prose_examples,
            "stub": _stub_examples}[family]
    out: list[Example] = []
    for _ in range(MAX_PASSES):  # a small split (held-out prose) gives more windows per file
        before = len(out)
        for example in make(tokenizer, limits, rng, split):
            if example not in out:
                out.append(example)
            if len(out) == n:
                return out
        if len(out) == before:
            break
    return out


def _shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def _window_from_line(text: str, key: str, family: str, tokenizer, limits: Limits,
                      rng: np.random.Generator, starts: list[int]) -> Example | None:
    """A prompt of a random length starting at a random one of ``starts`` (char offsets), and its continuation."""
    prefix = prompt_prefix(tokenizer)
    budget = limits.max_prompt - len(prefix)
    n_prompt = int(rng.integers(max(1, budget // 2), budget + 1))
    start = starts[int(rng.integers(len(starts)))]
    ids = encode(tokenizer, text[start:start + 8 * (n_prompt + limits.max_response)])
    if len(ids) < n_prompt + limits.max_response:
        return None
    line = text.count("\n", 0, start) + 1
    return Example(tuple(prefix + ids[:n_prompt]), tuple(ids[n_prompt:n_prompt + limits.max_response]),
                   family, f"{key}:{line}")


def _starts(text: str, sep: str, last_fraction: float = 0.8) -> list[int]:
    """Offsets just after each ``sep`` (and 0), leaving out the last part of the text."""
    starts = [0] + [m.end() for m in re.finditer(re.escape(sep), text)]
    return starts[: max(1, int(len(starts) * last_fraction))]


def _code_examples(tokenizer, limits: Limits, rng: np.random.Generator, split: str) -> Iterable[Example]:
    for rel, path in _shuffled(stdlib_files(split), rng):
        text = _read_stdlib(path)
        if text is None or len(text) < 400:
            continue
        example = _window_from_line(text, rel, "code", tokenizer, limits, rng, _starts(text, "\n"))
        if example is not None:
            yield example


def _read_stdlib(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


@functools.lru_cache(maxsize=None)
def _prose_documents(split: str) -> list[tuple[str, str]]:
    """(key, text): the language reference topics of pydoc_data and long module docstrings."""
    docs = []
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        topics = {}
    for name in sorted(topics):
        if is_heldout(f"pydoc:{name}") == (split == "heldout"):
            docs.append((f"pydoc:{name}", topics[name]))
    for rel, path in stdlib_files(split):
        text = _read_stdlib(path)
        doc = _module_docstring(text) if text else None
        if doc and len(doc) >= MIN_MODULE_DOC:
            docs.append((rel, doc))
    return docs


def _module_docstring(text: str) -> str | None:
    if not _DOCSTRING_START.match(text):  # cheap test before parsing the whole module
        return None
    try:
        return ast.get_docstring(ast.parse(text))
    except (SyntaxError, ValueError):
        return None


def _prose_examples(tokenizer, limits: Limits, rng: np.random.Generator, split: str) -> Iterable[Example]:
    for key, text in _shuffled(_prose_documents(split), rng):
        example = _window_from_line(text, key, "prose", tokenizer, limits, rng, _starts(text, "\n\n"))
        if example is not None:
            yield example


def instruct_prompt(tokenizer, signature: str, docstring: str) -> list[int]:
    """The chat-formatted request to write a function (the tokenizer's own chat template)."""
    return _chat_prompt(tokenizer, f"Write a Python function `{signature}` that does the following.\n\n{docstring}",
                        "instruct")


def _chat_prompt(tokenizer, request: str, family: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the {family!r} family needs a tokenizer with a chat template; this one has none")
    text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                         add_generation_prompt=True)
    return encode(tokenizer, text)


def _functions(text: str) -> list[ast.FunctionDef]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING and len(node.body) >= 3:
                found.append(node)
    return found


def _without_docstring(text: str, node: ast.FunctionDef) -> str:
    """The function's source (from its ``def`` line), dedented, without the docstring it is asked from."""
    lines = text.splitlines(keepends=True)
    doc = node.body[0]
    keep = lines[node.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    return textwrap.dedent("".join(keep))


def _drawn_functions(rng: np.random.Generator, split: str) -> Iterable[tuple[str, str, ast.FunctionDef]]:
    """(path relative to the standard library, its text, one function drawn) per file of ``split``
    that has a documented function, the files in an order drawn with ``rng``."""
    for rel, path in _shuffled(stdlib_files(split), rng):
        text = _read_stdlib(path)
        funcs = _functions(text) if text else []
        if funcs:
            yield rel, text, funcs[int(rng.integers(len(funcs)))]


def _instruct_examples(tokenizer, limits: Limits, rng: np.random.Generator, split: str) -> Iterable[Example]:
    for rel, text, node in _drawn_functions(rng, split):
        signature = f"{node.name}({ast.unparse(node.args)})"
        prompt = instruct_prompt(tokenizer, signature, ast.get_docstring(node))
        response = encode(tokenizer, f"```python\n{_without_docstring(text, node)}")[: limits.max_response]
        if len(prompt) <= limits.max_prompt and len(response) >= limits.max_response:
            yield Example(tuple(prompt), tuple(response), "instruct", f"{rel}:{node.lineno}:{node.name}")


def _from_def(text: str, node: ast.FunctionDef, end: int) -> str:
    """The function's source lines from its ``def`` line to line ``end``, less the ``def`` line's indent.

    A line that does not start with that indent (inside a string) is kept as it is, so the stub and
    the whole function are cut alike whatever their strings hold.
    """
    lines = text.splitlines(keepends=True)[node.lineno - 1:end]
    indent = lines[0][:len(lines[0]) - len(lines[0].lstrip())]
    return "".join(line[len(indent):] if line.startswith(indent) else line for line in lines)


def _stub_examples(tokenizer, limits: Limits, rng: np.random.Generator, split: str) -> Iterable[Example]:
    for rel, text, node in _drawn_functions(rng, split):
        if node.decorator_list:  # the stub starts at the def line: a decorated function would lose them
            continue
        stub = _from_def(text, node, node.body[0].end_lineno).rstrip()
        request = STUB_REQUESTS[int(rng.integers(len(STUB_REQUESTS)))].format(stub=stub)
        prompt = _chat_prompt(tokenizer, request, "stub")
        source = _from_def(text, node, node.end_lineno)
        response = encode(tokenizer, f"```python\n{source}```")[: limits.max_response]
        if len(prompt) <= limits.max_prompt and len(response) >= limits.max_response:
            yield Example(tuple(prompt), tuple(response), "stub", f"{rel}:{node.lineno}:{node.name}")
