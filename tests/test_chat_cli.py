"""``first-gguf chat`` as a person uses it: a real terminal (a pseudo-terminal), real keystrokes
(Enter, Ctrl-C, Ctrl-D) and the real default model; and the chat code path's KV reuse against
recomputing the conversation from scratch."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180.0  # seconds for one expected line: model load or an answer on one thread of a busy machine


class Terminal:
    """A program on a pseudo-terminal: type keys, wait for text, read its exit code."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="dumb", PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-m", "first_gguf.cli", *args]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C is SIGINT
            os.execve(sys.executable, argv, env)
        self.text, self.pos, self.closed = "", 0, False

    def _read(self, timeout: float) -> None:
        if self.closed or not select.select([self.fd], [], [], timeout)[0]:
            return
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.closed = not data
        self.text += data.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """Wait for ``pattern`` after what earlier calls matched; return its match."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while not (m := rx.search(self.text, self.pos)):
            if self.closed or time.monotonic() > deadline:
                why = "the program ended" if self.closed else f"{timeout:.0f} s passed"
                raise AssertionError(f"no {pattern!r} and {why}; the terminal shows:\n{self.text[-3000:]}")
            self._read(1.0)
        self.pos = m.end()
        return m

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def ask(self, line: str) -> str:
        """Type a line at the prompt; return everything up to the next prompt."""
        self.expect(r"you> ")
        start = self.pos
        self.type(line + "\r")
        self.expect(r"\n(?=you> )")
        return self.text[start:self.pos]

    def exit_code(self, timeout: float = 30.0, kill: bool = True) -> int | None:
        """The program's exit code; after ``timeout`` it is killed (an error), or None without ``kill``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        if not kill:
            return None
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"still running after {timeout} s:\n{self.text[-2000:]}")

    def close(self) -> None:
        try:
            if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        # the routers (first mode at 0.5): the status lines and /threshold are about routing
        routing = () if "--point" in args else ("--threshold", "0.5")
        opened.append(Terminal("chat", "--threads", "1", *routing, *args))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


def test_a_conversation_with_commands_then_eof(terminal):
    t = terminal("--max-tokens", "16")
    t.expect(r"24 layers, mode first; /help")
    first = t.ask("My name is Ada. Reply with just OK.")
    assert "[first: skipped" in first
    second = t.ask("What is my name?")
    assert "Ada" in second, "the second turn does not see the first"

    stats = t.ask("/stats")
    m = re.search(r"mode first, threshold ([0-9.]+); layers skipped this turn: (\d+) of 24", stats)
    assert m, stats
    assert len(re.findall(r"\b\d+:[01]\.\d\d", stats)) == 24, "one p_i per layer"
    assert re.search(r"routed over all (\d+)", stats), "the mean runs over the whole conversation"
    tok_s = float(re.search(r"= ([0-9.]+) tok/s; end to end ([0-9.]+) s", stats).group(1))
    assert tok_s > 0

    assert "(mode full)" in t.ask("/mode full")
    t.ask("What is my name?")
    full = t.ask("/stats")
    assert "mode full; layers skipped this turn: 0 of 24 (none)" in full
    assert "the routers do not run" in full
    assert "usage: /mode first|full" in t.ask("/mode fast")

    assert "outside [0, 1]; unchanged" in t.ask("/threshold 1.5")
    assert "not a number" in t.ask("/threshold x")
    assert "threshold 0.5 (set here; the file's is 0.5)" in t.ask("/threshold")  # --threshold's, kept by /mode
    assert "(threshold 0.2" in t.ask("/threshold 0.2")
    t.ask("/mode first")
    assert "Ada" in t.ask("Repeat my name.")  # the conversation survived the bad commands
    assert "threshold 0.2;" in t.ask("/stats")
    assert "/reset" in t.ask("/help")

    t.expect(r"you> ")
    t.type("\x04")  # Ctrl-D at the prompt
    assert t.exit_code() == 0


def test_ctrl_c_stops_an_answer_keeps_the_conversation_and_twice_quits(terminal):
    t = terminal("--max-tokens", "96")
    t.expect(r"you> ")
    start = t.pos
    t.type("Count from 1 to 50, one number per line.\r")
    t.expect(r"\n1\n")  # the answer is streaming
    t.type("\x03")
    t.expect(r"\n(?=you> )")
    cut = t.text[start:t.pos]
    assert "interrupted]" in cut, cut
    printed = int(re.findall(r"^(\d+)$", cut, re.M)[-1])
    assert printed < 40, f"Ctrl-C did not stop the answer (it reached {printed})"

    stats = t.ask("/stats")
    assert "[interrupted]" in stats
    # the partial answer is the assistant's turn: the model continues from what was printed
    t.expect(r"you> ")
    start = t.pos
    t.type("Which number did you stop at? Reply with the number only.\r")
    t.expect(r"\[first: skipped[^\]\n]*\]\n")
    nxt = t.text[start:t.pos]
    assert "interrupted" not in nxt, nxt

    # Ctrl-C the moment the answer's status shows, before or while the prompt is set up (the
    # line reader alone would hold a SIGINT landing there until the next key), then again
    t.type("\x03")
    t.expect(r"Ctrl-C again or Ctrl-D to quit")
    t.type("\x03")
    assert t.exit_code() == 0


class _Session:
    """A stand-in ChatSession: the first ``ask`` runs ``during`` after its first piece of three
    and ``after`` once the answer is complete (past its last check of ``stop``)."""

    def __init__(self, during=lambda: None, after=lambda: None) -> None:
        self.during, self.after, self.interrupted = during, after, []

    def ask(self, line, on_piece, stop):
        from first_gguf.chat import Turn, TurnStats

        first, stopped = not self.interrupted, False
        for i, piece in enumerate(["one ", "two ", "three"]):
            on_piece(piece)
            if first and i == 0:
                self.during()
            if stop():
                stopped = True
                break
        if first:
            self.after()
        self.interrupted.append(stopped)
        return Turn("", TurnStats(None, 0, 0.0, 0.0, stopped))


def _chat(session, lines):
    """``repl`` on scripted lines (then EOF); returns what it wrote to stderr."""
    import io

    from first_gguf.chat import repl

    script, err = iter(lines), io.StringIO()

    def read(prompt):
        line = next(script, None)
        if line is None:
            raise EOFError
        return line

    repl(session, read=read, out=io.StringIO(), err=err)
    return err.getvalue()


def _ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_an_answer_stops_it_and_is_spent():
    session = _Session(during=_ctrl_c)
    err = _chat(session, ["Count.", "Again."])
    assert session.interrupted == [True, False]
    assert "Ctrl-C again" not in err, "the press that stopped the answer also armed the prompt"


def test_ctrl_c_after_an_answers_last_token_is_taken_at_the_prompt():
    # between the answer's last check for Ctrl-C and the prompt: it used to set a flag no one read
    session = _Session(after=_ctrl_c)
    err = _chat(session, ["Count."])
    assert session.interrupted == [False]
    assert "Ctrl-C again or Ctrl-D to quit" in err


def test_ctrl_c_that_lands_before_the_line_reader_waits_still_interrupts_it():
    """CPython's line reader prints the prompt, then waits in select(); a SIGINT whose handler ran in
    between leaves only its wakeup byte, and the wait goes on until a key. Here the reader records
    such a press and waits the same way: a poke from the watcher must end the wait."""
    from first_gguf.chat import _CtrlC

    r, w = os.pipe()

    def reader(prompt):
        os.write(ctrl._w, bytes([signal.SIGINT]))  # what the C-level handler leaves behind
        select.select([r], [], [], 30)  # a wait only EINTR ends (and then the handlers run)
        return "the wait was not interrupted"

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    try:
        with _CtrlC() as ctrl:
            t0 = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                ctrl.read(reader, "you> ")
            assert time.monotonic() - t0 < 10
            assert not ctrl.pending()
    finally:
        os.close(r)
        os.close(w)
    assert signal.getsignal(signal.SIGINT) is before, "the handler is restored"


def test_kv_reuse_across_turns_equals_a_fresh_model_per_turn():
    """The chat path (template, streaming, FirstModel's reuse) gives the tokens of recomputing each turn anew."""
    from first_gguf.chat import ChatSession
    from first_gguf.shipped import resolve_model
    from first_gguf.runtime import FirstModel

    path = resolve_model(None)
    # one token per ubatch: a reused prefix and a recomputed one are then bit-identical in llama.cpp
    kw = dict(n_ctx=2048, n_threads=1, n_threads_batch=1, n_batch=64, n_ubatch=1, threshold=0.5)  # the routers
    turns = ["Write a Python function that reverses a string.", "Now make it recursive.", "Add a docstring."]
    system = "You are a concise coding assistant."
    chat = ChatSession(FirstModel(path, **kw), system=system, max_tokens=16)
    for i, text in enumerate(turns):
        history = list(chat.messages)
        got = chat.ask(text)
        fresh = ChatSession(FirstModel(path, **kw), system=system, max_tokens=16)
        fresh.messages = history
        want = fresh.ask(text)
        assert got.stats.report.mask == want.stats.report.mask, f"turn {i}: masks differ"
        assert got.text == want.text, f"turn {i}: {got.text!r} != {want.text!r}"
        assert got.stats.report.n_tokens == want.stats.report.n_tokens
        if i:
            assert got.stats.report.n_evaluated < want.stats.report.n_evaluated, f"turn {i}: nothing reused"
    assert chat.last.stats.report.skipped, "the default routers skip no layer here: the test proves little"


def test_model_argument_is_a_file_or_a_zoo_name(tmp_path):
    from first_gguf.errors import FirstError
    from first_gguf.shipped import resolve_model

    f = tmp_path / "m.gguf"
    f.write_bytes(b"")
    assert resolve_model(str(f)) == f
    with pytest.raises(FirstError, match="no such file, and not a zoo model"):
        resolve_model(tmp_path / "missing.gguf")


def test_a_conversation_past_the_context_is_a_clear_error_and_stays_as_it_was():
    from first_gguf.chat import ChatSession
    from first_gguf.errors import FirstError
    from first_gguf.shipped import resolve_model
    from first_gguf.runtime import FirstModel

    chat = ChatSession(FirstModel(resolve_model(None), n_ctx=512, n_threads=1, n_threads_batch=1), max_tokens=4)
    chat.ask("Hi")
    before = list(chat.messages)
    with pytest.raises(FirstError, match="no longer fits the context"):
        chat.ask("hello " * 600)
    assert chat.messages == before
    assert chat.ask("Hi again").stats.report is not None  # and the session goes on


def test_default_point_and_the_point_command():
    t = Terminal("chat", "--threads", "1", "--max-tokens", "4")  # no --point: the file's default
    try:
        t.expect(r"24 layers, mode mask, point fast-quality-short")
        listing = t.ask("/point")
        assert re.search(r"\* fast-quality-short: ", listing) and "balanced: skip [3, 4]" in listing
        assert re.search(r"(?m)^\s+quality: skip \[4\]\s*$", listing)
        assert re.search(r"(?m)^\s+quality-short: skip \[4\], short vocabulary\s*$", listing)
        assert "fast: thin [0, 1, 2" in listing
        assert "fast-short: thin [0, 1, 2" in listing and "short: short vocabulary" in listing
        assert "balanced-warm: skip [3, 4], first 3 decode steps at full depth" in listing
        assert ("no operating point 'nonsense'; it has quality, balanced, balanced-warm, fast, short, quality-short, "
                "fast-short, fast-quality-short; unchanged") in t.ask("/point nonsense")
        assert "(point balanced" in t.ask("/point balanced")
        answer = t.ask("Say hi.")
        assert "[mask: skipped 2/24 layers (point balanced)" in answer, answer
        assert "(point fast" in t.ask("/point fast")
        answer = t.ask("Say hi.")
        assert "[mask: skipped 0/24 layers, 24 FFN stand-ins (point fast)" in answer, answer
        assert "0 of 24 (none); 24 FFNs decoded by their stand-ins" in t.ask("/stats")
        assert "(point quality-short" in t.ask("/point quality-short")
        answer = t.ask("Say hi.")
        assert "[mask: skipped 1/24 layers, short vocab (point quality-short)" in answer, answer
        assert "1 of 24 (4); short output vocabulary" in t.ask("/stats")
        t.type("\x04")
        assert t.exit_code() == 0
    finally:
        t.close()


def test_a_draft_drafts_for_the_chat_and_stats_count_what_was_kept():
    """--draft: the default model at full depth, verified drafts of itself at its default point."""
    t = Terminal("chat", "--threads", "1", "--max-tokens", "24", "--point", "short", "--draft",
                 "qwen2.5-coder-0.5b-instruct", "--draft-tokens", "3")
    try:
        t.expect(r"point short")
        t.expect(r"draft qwen2\.5-coder-0\.5b-instruct\.first\.gguf at fast-quality-short, up to 3 tokens")
        t.ask("Write a Python function that adds two numbers.")
        stats = t.ask("/stats")
        m = re.search(r"up to 3 tokens, (\d+) of (\d+) drafted tokens kept \(since the chat began\)", stats)
        assert m and 0 < int(m.group(1)) <= int(m.group(2)), stats
        t.type("\x04")
        assert t.exit_code() == 0
    finally:
        t.close()
