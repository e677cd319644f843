"""``first-gguf chat``: a streaming multi-turn chat in the terminal, with FiRST's report per answer.

Every turn goes through the model's own chat template (``create_chat_completion``, streamed)
and starts with one prefill (docs/FORMAT.md section 3): ``FirstModel`` reuses the cache of
earlier turns within its rules, so each answer routes as if the whole conversation were
evaluated anew, and gives the same tokens.

Ctrl-C during an answer stops it after the current token; the part already printed stays
in the conversation as the assistant's turn (the model remembers what you saw), even when
it is empty. At the prompt, Ctrl-C twice in a row or Ctrl-D quits.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from .errors import FirstError

HELP = """commands:
  /reset            start a new conversation (the system prompt stays)
  /stats            the last answer: mode, layers skipped, p_i per layer, decode tok/s, end-to-end time
  /mode first|full  route with the routers (first) or run every layer (full)
  /threshold [T]    show the router threshold, or set it to T in [0, 1] ('file': the file's own)
  /point [NAME]     list the file's named operating points, or use one (a skip set or a threshold)
  /help             this text
Ctrl-C stops an answer; the part already printed stays in the conversation as the answer.
Ctrl-C twice at the prompt, or Ctrl-D, quits."""


@dataclass(frozen=True)
class TurnStats:
    """How one answer was produced.

    Attributes:
        report: the prefill's ``PrefillReport`` (mode, mask, p_i, threshold, positions).
        n_decode: decode steps run after the first streamed chunk.
        t_decode: seconds from the first streamed chunk to the end of the answer.
        t_total: seconds from the request to the end (chat template, prefill and decode).
        interrupted: the answer was stopped by Ctrl-C.
    """

    report: object | None
    n_decode: int
    t_decode: float
    t_total: float
    interrupted: bool = False

    @property
    def decode_tok_s(self) -> float:
        return self.n_decode / self.t_decode if self.n_decode and self.t_decode > 0 else 0.0


@dataclass(frozen=True)
class Turn:
    text: str
    stats: TurnStats


class ChatSession:
    """A conversation with one ``FirstModel``: the messages so far and the stats of the last answer.

    Args:
        llm: a ``FirstModel`` (its mode and threshold apply to the next answer).
        system: the system prompt, if any.
        max_tokens: at most this many tokens per answer.
        temperature: 0 is greedy (reproducible); above 0 samples.
    """

    def __init__(self, llm, system: str | None = None, max_tokens: int = 256, temperature: float = 0.0) -> None:
        self.llm, self.system, self.max_tokens, self.temperature = llm, system, max_tokens, temperature
        self.messages: list[dict] = []
        self.last: Turn | None = None

    def reset(self) -> None:
        self.messages, self.last = [], None

    def history(self) -> list[dict]:
        """The messages the next prompt is made of, system prompt first."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def ask(self, user: str, on_piece: Callable[[str], None] = lambda s: None,
            stop: Callable[[], bool] = lambda: False) -> Turn:
        """Answer ``user``, streaming pieces of text to ``on_piece``; ``stop()`` True ends the answer early.

        The question and the answer (all of it, or what was streamed before ``stop``) join
        the conversation.

        Raises:
            FirstError: the conversation no longer fits the context (it is left unchanged).
        """
        messages = self.history() + [{"role": "user", "content": user}]
        t0 = time.perf_counter()
        t_first, n_first, pieces, stopped = None, 0, [], False
        with contextlib.closing(self._stream(messages)) as stream:
            for chunk in stream:
                if t_first is None:  # the prompt is evaluated and the first token chosen
                    t_first, n_first = time.perf_counter(), self.llm.n_tokens
                piece = chunk["choices"][0]["delta"].get("content") or ""
                if piece:
                    pieces.append(piece)
                    on_piece(piece)
                if stop():
                    stopped = True
                    break
        t_end = time.perf_counter()
        t_first = t_first or t_end
        stats = TurnStats(self.llm.last_prefill, self.llm.n_tokens - n_first if n_first else 0,
                          t_end - t_first, t_end - t0, stopped)
        text = "".join(pieces)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        self.last = Turn(text, stats)
        return self.last

    def _stream(self, messages: list[dict]) -> Iterator[dict]:
        stream = self.llm.create_chat_completion(messages, max_tokens=self.max_tokens, temperature=self.temperature,
                                                 repeat_penalty=1.0, seed=0, stream=True)
        try:
            yield next(stream)  # the prompt's length is checked here, before any evaluation
        except StopIteration:
            return
        except ValueError as exc:
            if "exceed context window" in str(exc):
                raise FirstError(f"the conversation no longer fits the context ({exc}); /reset starts anew") from None
            raise
        try:
            yield from stream
        finally:
            stream.close()


# --- the terminal loop -----------------------------------------------------------------

def format_stats(session: ChatSession) -> str:
    """The ``/stats`` text of the last answer."""
    if session.last is None:
        return "no answer yet"
    s, rep = session.last.stats, session.last.stats.report
    lines = []
    if rep is not None:
        skipped = ", ".join(map(str, rep.skipped)) or "none"
        head = f"mode {rep.mode}" + (f", threshold {rep.threshold:.3g}" if rep.threshold is not None else "")
        lines.append(f"{head}; layers skipped this turn: {len(rep.skipped)} of {len(rep.mask)} ({skipped})"
                     + (f"; {len(rep.thin)} FFNs decoded by their stand-ins" if rep.thin else "")
                     + ("; short output vocabulary" if rep.vocab is not None else "")
                     + (f"; the first {rep.warmup} decode steps at full depth" if rep.warmup else ""))
        if rep.probs is not None:
            lines.append("p_i: " + " ".join(f"{i}:{p:.2f}{'*' if not rep.mask[i] else ''}"
                                            for i, p in enumerate(rep.probs)) + "   (* skipped)")
        else:
            lines.append("p_i: none (the routers do not run in this mode)")
        lines.append(f"prompt: {rep.n_evaluated} positions evaluated this turn"
                     + (f", routed over all {rep.n_tokens}" if rep.probs is not None else ""))
    draft = getattr(session.llm, "draft_model", None)
    if hasattr(draft, "describe"):
        lines.append(draft.describe() + " (since the chat began)")
    lines.append(f"answer: {s.n_decode} decode steps in {s.t_decode:.2f} s = {s.decode_tok_s:.1f} tok/s; "
                 f"end to end {s.t_total:.2f} s (prompt included)" + (" [interrupted]" if s.interrupted else ""))
    return "\n".join(lines)


def _status_line(turn: Turn) -> str:
    rep, s = turn.stats.report, turn.stats
    at = f" (point {rep.point})" if rep is not None and rep.point else ""
    thin = f", {len(rep.thin)} FFN stand-ins" if rep is not None and rep.thin else ""
    thin += ", short vocab" if rep is not None and rep.vocab is not None else ""
    where = f"{rep.mode}: skipped {len(rep.skipped)}/{len(rep.mask)} layers{thin}{at}" if rep is not None else "no prefill"
    cut = ", interrupted" if s.interrupted else ""
    return f"[{where}, {s.decode_tok_s:.1f} tok/s, {s.t_total:.2f} s{cut}]"


class _CtrlC:
    """Ctrl-C for a whole chat session: one SIGINT handler from the first prompt to the last.

    Presses are counted from the handler's wakeup fd, so a press is never lost whatever the main
    thread is doing. While an answer streams a press only counts (``pending()`` stops it), so no
    KeyboardInterrupt lands inside the runtime; ``read`` raises KeyboardInterrupt once per press,
    also for one that came after an answer's last token. CPython's line reader prints the prompt,
    then waits in select(): a SIGINT landing in between is only acted on at the next key, so a
    watcher thread pokes the main thread with SIGUSR2 every 50 ms while a press waits at the
    prompt (select returns EINTR and the handler runs).
    """

    POKE = signal.SIGUSR2

    def __init__(self) -> None:
        self.pressed = 0  # SIGINTs counted from the wakeup fd (under _lock)
        self.taken = 0  # presses acted on: an answer stopped, or a KeyboardInterrupt at the prompt
        self.reading = False
        self._lock = threading.Lock()
        self._interrupt = KeyboardInterrupt()

    def __enter__(self) -> "_CtrlC":
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._saved = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, self.POKE)}
        self._wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(threading.main_thread().ident,),
                                         name="ctrl-c", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        os.write(self._w, b"\0")  # no signal is numbered 0: the watcher ends (then no poke can come)
        self._watcher.join()
        signal.set_wakeup_fd(self._wakeup)
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        os.close(self._r)
        os.close(self._w)

    def pending(self) -> bool:
        self._count()
        return self.taken < self.pressed

    def take_all(self) -> None:
        """The presses so far did their work (they stopped an answer)."""
        self._count()
        self.taken = self.pressed

    def read(self, reader: Callable[[str], str], prompt: str) -> str:
        """``reader(prompt)``; a Ctrl-C pressed before it returns raises KeyboardInterrupt, one per press."""
        while True:
            if self.pending():
                self.taken += 1
                raise KeyboardInterrupt
            self._interrupt = KeyboardInterrupt()
            try:
                self.reading = True
                return reader(prompt)
            except KeyboardInterrupt:
                pass  # the loop takes the press; a late poke alone reads again
            finally:
                self.reading = False

    def _on_signal(self, signum, frame) -> None:
        # no calls here: input() may run handlers with its KeyboardInterrupt already set, and
        # then a handler can only raise (an exception it has to create or a None it returns
        # would be a SystemError)
        if self.reading:
            raise self._interrupt

    def _count(self) -> bool:
        """Count the SIGINTs the wakeup fd holds; True once ``__exit__`` asked the watcher to end."""
        with self._lock:
            try:
                data = os.read(self._r, 4096)
            except BlockingIOError:
                return False
            self.pressed += data.count(signal.SIGINT)
        return 0 in data

    def _watch(self, main: int) -> None:
        while True:
            owed = self.reading and self.taken < self.pressed
            if select.select([self._r], [], [], 0.05 if owed else None)[0]:
                if self._count():
                    return
            elif self.reading and self.taken < self.pressed:
                signal.pthread_kill(main, self.POKE)


def command(session: ChatSession, line: str) -> str:
    """Run one ``/command``; returns the text to show. Errors are messages, the conversation stays."""
    name, _, arg = line[1:].strip().partition(" ")
    arg, llm = arg.strip(), session.llm
    if name == "help":
        return HELP
    if name == "reset":
        session.reset()
        return "(new conversation)"
    if name == "stats":
        return format_stats(session)
    if name == "mode":
        if arg not in ("first", "full"):
            return f"usage: /mode first|full (now {llm.mode})"
        try:
            llm.configure(mode=arg)
        except FirstError as exc:
            return f"cannot switch: {exc}"
        return f"(mode {arg})"
    if name == "threshold":
        return _threshold(llm, arg)
    if name == "point":
        return _point(llm, arg)
    return f"unknown command /{name}; /help lists them"


def _point(llm, arg: str) -> str:
    points = llm.points
    if not arg:
        if not len(points):
            return "this file has no named operating points"
        return "\n".join(f"{'*' if p.name == llm.point else ' '} {p.name}: {p.describe()}" for p in points)
    try:
        llm.configure(point=arg)
    except FirstError as exc:
        return f"{exc}; unchanged"
    return f"(point {arg}; applies from the next answer)"


def _threshold(llm, arg: str) -> str:
    file_value = llm.routers.threshold if llm.routers is not None else None
    if not arg:
        if llm.point is not None and llm.mode == "first":
            return f"threshold {llm.threshold} (point {llm.point}; the file's is {file_value})"
        if llm.threshold is None:
            return f"threshold {file_value} (the file's)"
        return f"threshold {llm.threshold} (set here; the file's is {file_value})"
    if arg == "file":
        llm.reset_threshold()
        return f"(threshold {file_value}, the file's)"
    try:
        value = float(arg)
    except ValueError:
        return f"not a number: {arg!r}; /threshold T takes T in [0, 1]; unchanged"
    try:
        llm.configure(threshold=value)
    except FirstError as exc:
        return f"{exc}; unchanged"
    return f"(threshold {value}; applies from the next answer)"


def repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> None:
    """Read lines until EOF or Ctrl-C twice at the prompt; answer them or run their /command.

    Call it from the main thread: it owns SIGINT (and SIGUSR2) while it runs.
    """
    with _CtrlC() as ctrl_c:
        _loop(session, ctrl_c, read, out, err)


def _loop(session: ChatSession, ctrl_c: _CtrlC, read: Callable[[str], str], out: TextIO, err: TextIO) -> None:
    armed = False  # the last prompt ended in Ctrl-C
    while True:
        try:
            line = ctrl_c.read(read, "you> ").strip()
        except EOFError:
            print(file=out)
            return
        except KeyboardInterrupt:
            if armed:
                print(file=out)
                return
            armed = True
            print("\n(Ctrl-C again or Ctrl-D to quit; /help for commands)", file=err, flush=True)
            continue
        armed = False
        if not line:
            continue
        if line.startswith("/"):
            print(command(session, line), file=out, flush=True)
            continue
        _answer(session, line, ctrl_c, out, err)


def _answer(session: ChatSession, line: str, ctrl_c: _CtrlC, out: TextIO, err: TextIO) -> None:
    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        turn = session.ask(line, on_piece=show, stop=ctrl_c.pending)
    except FirstError as exc:
        print(f"error: {exc}", file=err, flush=True)
        return
    if turn.stats.interrupted:
        ctrl_c.take_all()
    # a press after the last token was checked stays pending: the prompt takes it as its Ctrl-C
    print(file=out, flush=True)
    print(_status_line(turn), file=err, flush=True)


def run_chat(model: str | Path | None = None, threshold: float | None = None, max_tokens: int = 256,
             threads: int | None = None, system: str | None = None, n_ctx: int = 4096,
             temperature: float = 0.0, gpu_layers: int = 0, point: str | None = None,
             draft: str | Path | None = None, draft_point: str | None = None, draft_tokens: int = 4) -> None:
    """Load MODEL (file, zoo name or None: the default with its routers) and chat in the terminal;
    with DRAFT (file or zoo name), a smaller model at a point drafts tokens that MODEL verifies."""
    from .runtime import FirstModel
    from .shipped import open_draft, resolve_model

    path = resolve_model(model)
    # threads for the prompt too: llama-cpp-python's default there is every core
    common = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_gpu_layers=gpu_layers)
    drafter = open_draft(draft, draft_point, draft_tokens, **common)
    llm = FirstModel(path, threshold=threshold, point=point, draft_model=drafter, **common)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    at = f", point {llm.point}" if llm.point is not None else ""
    print(f"{path.name}: {llm.n_layer} layers, mode {llm.mode}{at}; /help for commands, Ctrl-D quits",
          file=sys.stderr, flush=True)
    if drafter is not None:
        print(drafter.describe(), file=sys.stderr, flush=True)
    repl(ChatSession(llm, system=system, max_tokens=max_tokens, temperature=temperature))
