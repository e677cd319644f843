"""Training examples: the user's data files and the built-in families (``first_gguf.prompts``).

User data: text files, directories of them (recursively, sorted), and JSONL files (``.jsonl``)
whose lines hold ``prompt`` and ``response`` strings, or a ``text`` string. Text is cut into
consecutive windows of ``max_prompt + max_response`` tokens, each split into a prompt and its
continuation. A ``prompt``/``response`` line is used as given (no chat template): the prompt
must fit ``max_prompt``, the response is cut to ``max_response`` tokens. User data is all
training data. The built-in families and their train/held-out split are ``prompts.py``'s
(torch-free, so evaluation uses them without this package).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import FirstError
from ..prompts import (FAMILIES, MIN_RESPONSE, SPLITS, DataError, Example, Limits, builtin_examples,  # noqa: F401
                       check_request, encode, is_heldout, prompt_prefix, rng_for)

USER_FAMILY = "data"


def build_examples(tokenizer, limits: Limits, data: Sequence[str] | None = None,
                   tasks: Sequence[str] = (), n_examples: int = 96, seed: int = 0,
                   split: str = "train") -> list[Example]:
    """The examples of a run: ``n_examples`` shared evenly between the user data and each family.

    Args:
        tokenizer: The base model's HF tokenizer.
        limits: Token budgets.
        data: User files or directories (all training data).
        tasks: Built-in families to draw from.
        n_examples: Total examples; each source gets ceil(n / sources) (fewer if it has fewer).
        seed: Which examples are drawn (and where windows start).
        split: ``train`` or ``heldout`` (built-in families only).

    Returns:
        The examples, grouped by source in the order given.
    """
    check_request(tasks, split)
    if not data and not tasks:
        raise FirstError("no training data: give data files or at least one built-in task family")
    limits.check()
    n_sources = len(tasks) + (1 if data else 0)
    per_source = math.ceil(n_examples / n_sources)
    examples: list[Example] = []
    if data:
        found = load_user_data(data, tokenizer, limits)
        examples += _sample(found, per_source, rng_for(seed, USER_FAMILY, split))
    return examples + builtin_examples(tokenizer, limits, tasks, per_source, seed, split)


def _sample(items: list[Example], n: int, rng: np.random.Generator) -> list[Example]:
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]

def split_windows(ids: list[int], prefix: list[int], limits: Limits, family: str,
                  source: str) -> list[Example]:
    """Consecutive windows of a token sequence, each a prompt and its continuation."""
    width = limits.max_prompt - len(prefix) + limits.max_response
    out = []
    for start in range(0, len(ids), width):
        chunk = ids[start:start + width]
        if len(chunk) < 2 * MIN_RESPONSE:
            continue
        n_resp = min(limits.max_response, len(chunk) // 2)
        n_prompt = min(limits.max_prompt - len(prefix), len(chunk) - n_resp)
        out.append(Example(tuple(prefix + chunk[:n_prompt]), tuple(chunk[n_prompt:n_prompt + n_resp]),
                           family, f"{source}@{start}"))
    return out

# --- user data -------------------------------------------------------------------------------

def load_user_data(paths: Sequence[str], tokenizer, limits: Limits) -> list[Example]:
    """Every example of the user's files (see the module docstring); clear errors naming the file."""
    examples = []
    for path in _user_files(paths):
        text = read_text(path)
        if path.suffix == ".jsonl":
            examples += _jsonl_examples(path, text, tokenizer, limits)
        else:
            found = split_windows(encode(tokenizer, text), prompt_prefix(tokenizer), limits, USER_FAMILY, str(path))
            if not found:
                raise DataError(f"{path}: too short to split into a prompt and a continuation "
                                f"(needs at least {2 * MIN_RESPONSE} tokens)")
            examples += found
    return examples


def _user_files(paths: Sequence[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise DataError(f"{path}: directory holds no files")
            yield from files
        elif path.is_file():
            yield path
        else:
            raise DataError(f"{path}: no such file or directory")


def read_text(path: Path) -> str:
    """A file's text: UTF-8 and not empty, else a DataError naming the file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def _jsonl_examples(path: Path, text: str, tokenizer, limits: Limits) -> list[Example]:
    prefix, out = prompt_prefix(tokenizer), []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            out.append(_pair_example(prefix + encode(tokenizer, obj["prompt"]), encode(tokenizer, obj["response"]),
                                     limits, where))
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            found = split_windows(encode(tokenizer, obj["text"]), prefix, limits, USER_FAMILY, where)
            if not found:
                raise DataError(f"{where}: text too short to split into a prompt and a continuation")
            out += found
        else:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{where}: expected string fields 'prompt' and 'response', or 'text' (found {keys})")
    return out


def _pair_example(prompt: list[int], response: list[int], limits: Limits, where: str) -> Example:
    if len(prompt) + len(response) > limits.context:
        raise DataError(f"{where}: prompt and response are {len(prompt) + len(response)} tokens, longer than "
                        f"the model's context of {limits.context} tokens")
    if not prompt:
        raise DataError(f"{where}: empty prompt")
    if len(prompt) > limits.max_prompt:
        raise DataError(f"{where}: prompt has {len(prompt)} tokens, more than max_prompt_tokens="
                        f"{limits.max_prompt} (raise it or shorten the prompt)")
    if len(response) < MIN_RESPONSE:
        raise DataError(f"{where}: response has {len(response)} token(s), at least {MIN_RESPONSE} are needed")
    return Example(tuple(prompt), tuple(response[:limits.max_response]), USER_FAMILY, where)
