"""Exceptions the CLI turns into one clear line and a non-zero exit."""

from __future__ import annotations


class FirstError(Exception):
    """Base class: a user-facing failure whose message says what is wrong and where."""


class FormatError(FirstError):
    """A GGUF or router file breaks the FiRST-GGUF format (names the file and the problem)."""


class ZooError(FirstError):
    """A zoo model cannot be installed, assembled or verified."""


class BuildError(FirstError):
    """The patched llama.cpp build cannot be fetched, patched, built or installed."""


class RuntimeNotBuiltError(FirstError):
    """The loaded llama-cpp-python library lacks the FiRST symbols (a stock or stale build)."""
