"""Functions of the standard library rewritten from their signature and docstring, checked by their own doctests.

A functional check that is not HumanEval: every public function or method of the running
interpreter's standard library whose docstring carries examples (``>>>``) and whose body has
at least ``MIN_STATEMENTS`` statements besides the docstring becomes a problem. The prompt is
the module's imports, then the function's ``def`` line(s) and docstring (a method dedented to
a top-level ``def`` that takes ``self``); the model continues it as a raw completion, cut by
HumanEval's stop sequences. The program imports the real module, compiles prompt + completion
in a copy of the module's namespace (its helpers stay reachable), puts the new function in
the module (a method on its class), and runs the docstring's examples (``ELLIPSIS``,
``NORMALIZE_WHITESPACE``); it passes when every example does, in :mod:`.sandbox` as HumanEval's
programs do.

A problem is kept only when its original body passes the same program (checked once per
process in the sandbox), so a failure is the completion's. Modules with side effects on import
(a browser, a window, the Zen) are left out, and at most ``PER_MODULE`` problems come from one
module (the first in file order), so one module's many small methods do not make the score.
The set depends on the interpreter's version (``SOURCE``, which the report names); rows of one
run directory compare only on one interpreter.
"""

from __future__ import annotations

import ast
import functools
import platform
import textwrap
from dataclasses import dataclass

from ..errors import FirstError
from ..prompts import _read_stdlib, stdlib_files
from .humaneval import END_MARKER, Problem
from .sandbox import run_programs

MIN_STATEMENTS = 2
PER_MODULE = 8
SKIP_MODULES = frozenset({"antigravity", "this", "turtle", "webbrowser", "pydoc"})
SKIP_PACKAGES = ("tkinter", "idlelib", "ensurepip", "lib2to3")
SOURCE = f"the standard library of Python {platform.python_version()}"


@dataclass(frozen=True)
class Candidate:
    """One function or method with examples, before its check: where it is and its text in parts."""

    module: str
    owner: str | None       # the class of a method, None for a module-level function
    name: str
    imports: str            # the module's top-level import statements
    head: str               # def line(s) and docstring, dedented
    body: str               # the original body after the docstring, dedented like ``head``
    docstring: str

    @property
    def qualname(self) -> str:
        return f"{self.owner}.{self.name}" if self.owner else self.name

    def problem(self) -> Problem:
        prompt = f"{self.imports}\n\n\n{self.head}" if self.imports else self.head
        return Problem(task_id=f"stdlib/{self.module}:{self.qualname}", prompt=prompt, test=self.test(),
                       entry_point=self.name, canonical_solution=self.body)

    def test(self) -> str:
        """The code after ``prompt + completion`` (kept in ``Problem.test``): see :func:`program`."""
        place = (f"setattr(_M.{self.owner}, {self.name!r}, _ns[{self.name!r}])" if self.owner
                 else f"_M.__dict__[{self.name!r}] = _ns[{self.name!r}]")
        return textwrap.dedent(f"""\
            import doctest as _doctest, importlib as _importlib, sys as _sys
            _M = _importlib.import_module({self.module!r})
            _ns = dict(_M.__dict__)
            exec(compile(_CODE, "<completion>", "exec"), _ns)
            {place}
            _t = _doctest.DocTestParser().get_doctest({self.docstring!r}, dict(_M.__dict__), {self.qualname!r}, None, 0)
            _r = _doctest.DocTestRunner(optionflags=_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE)
            _r.run(_t, out=_sys.stderr.write)
            if _r.failures or not _r.tries:
                _sys.exit(1)
            _sys.stderr.write({END_MARKER!r} + "\\n")
            """)


def program(problem: Problem, completion: str) -> str:
    """The script that passes iff ``completion`` (of ``problem.prompt``) passes the docstring's examples."""
    return f"_CODE = {(problem.prompt + completion)!r}\n{problem.test}"


def load_problems(limit: int | None = None) -> list[Problem]:
    """The checked problems of this interpreter's standard library, in a fixed order (module, then file order).

    Raises:
        FirstError: ``limit`` < 1, or no problem passes with its original body.
    """
    if limit is not None and limit < 1:
        raise FirstError(f"doctest limit must be >= 1, got {limit}")
    return list(_checked()[:limit])


@functools.cache
def _checked() -> tuple[Problem, ...]:
    problems = [c.problem() for c in candidates()]
    outcomes = run_programs([program(p, p.canonical_solution) for p in problems], timeout=10.0, workers=2)
    kept = tuple(p for p, o in zip(problems, outcomes) if o.passed and o.detail.rstrip().endswith(END_MARKER))
    if not kept:
        raise FirstError(f"no function of {SOURCE} passes its own doctests in the sandbox")
    return kept


def candidates() -> list[Candidate]:
    """Every function or method with examples in the standard library's modules, at most PER_MODULE each."""
    out: list[Candidate] = []
    for rel, path in sorted(stdlib_files("train") + stdlib_files("heldout")):
        module = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        if module in SKIP_MODULES or module.startswith(SKIP_PACKAGES) or module.startswith("_"):
            continue
        text = _read_stdlib(path)
        if not text or ">>>" not in text:
            continue
        out += _module_candidates(module, text)[:PER_MODULE]
    return out


def _module_candidates(module: str, text: str) -> list[Candidate]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    imports = "\n".join(ast.get_source_segment(text, n) or "" for n in tree.body
                        if isinstance(n, (ast.Import, ast.ImportFrom)) and n.col_offset == 0)
    lines = text.splitlines(keepends=True)
    found = []
    for node, owner in _functions(tree):
        doc = ast.get_docstring(node)
        if not doc or ">>>" not in doc or len(node.body) - 1 < MIN_STATEMENTS:
            continue
        split = node.body[0].end_lineno
        whole = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
        n_head = split - node.lineno + 1
        head_lines = whole.splitlines(keepends=True)
        found.append(Candidate(module, owner, node.name, imports, "".join(head_lines[:n_head]),
                               "".join(head_lines[n_head:]), doc))
    return found


def _functions(tree: ast.Module):
    """(function, owning class or None): public, undecorated, synchronous, at module level or in a top-level class."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not node.decorator_list:
            yield from ((f, node.name) for f in node.body if _usable(f))
        elif _usable(node):
            yield node, None


def _usable(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and not node.decorator_list
