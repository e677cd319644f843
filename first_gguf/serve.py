"""``first-gguf serve``: llama-cpp-python's OpenAI-compatible server with a ``FirstModel`` behind it.

Everything HTTP is ``llama_cpp.server``'s: its FastAPI app, settings, request schemas, SSE
streaming and its lock, which serves one request at a time (a stream holds it until its last
chunk). What this module adds:

- the model is a ``ServedModel``, a ``FirstModel`` whose completions carry a ``first`` object
  (mode, point, threshold, skipped layers, p_i per layer, the layers decoded with thinned FFNs,
  whether the short output vocabulary decoded, the decode steps run at full depth first
  (``warmup``), the prompt positions routed over and
  evaluated, and t_start/t_end of the generation on the server's monotonic clock):
  at the top level of a non-streamed response, in the last chunk of a stream (the one with
  a ``finish_reason``);
- two request fields of our own on ``/v1/chat/completions`` and ``/v1/completions``:
  ``first_mode`` ("first" or "full") and ``first_threshold`` (in [0, 1]) for that request
  only; a bad value is a 400;
- errors as 4xx where theirs would be a 500 or a broken stream: a malformed body (bad JSON,
  wrong types) is FastAPI's 422, an unknown ``model`` a 404, a prompt longer than the context a
  400 for streams too (checked before the stream starts).

Settings come from the command line only (no environment variables, no CONFIG_FILE).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time,
# and they name classes imported inside functions (the server extra is imported on use).
import contextlib
import contextvars
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import FirstError
from .runtime import FirstModel

SERVER_EXTRA = "the server needs the `server` extra: pip install 'first-gguf[server]'"


@dataclass(frozen=True)
class RequestOptions:
    """FiRST settings of one request (None: the server's)."""

    mode: str | None = None
    threshold: float | None = None


_REQUEST: contextvars.ContextVar[RequestOptions] = contextvars.ContextVar("first_request", default=RequestOptions())


class ServedModel(FirstModel):
    """A ``FirstModel`` for the server: per-request settings and a ``first`` object on every completion.

    Args:
        model_path: the GGUF.
        mode, threshold: the server's defaults (None: FirstModel's and the file's).
        **kwargs: ``FirstModel`` / ``llama_cpp.Llama`` arguments.
    """

    def __init__(self, model_path: str | Path, *, mode: str | None = None, threshold: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model_path, mode=mode, threshold=threshold, **kwargs)
        self.default_mode, self.default_threshold, self.default_point = self.mode, threshold, self.point
        self._open: Iterator | None = None  # the last stream, closed before the next generation
        self._t_start = 0.0
        from llama_cpp import llama_chat_format

        base = (self.chat_handler or self._chat_handlers.get(self.chat_format)
                or llama_chat_format.get_chat_completion_handler(self.chat_format))
        self.chat_handler = self._chat_with_first(base)

    def create_completion(self, prompt, **kwargs: Any):  # noqa: D102  (Llama's, plus the first object)
        if self._open is not None:  # a stream its client left: end it here, before anything else runs
            self._open.close()
            self._open = None
        opts = _REQUEST.get()
        if opts.mode is None and opts.threshold is None and self.default_point is not None:
            self.configure(point=self.default_point)  # the server's operating point (a file's default)
        else:
            self.configure(mode=opts.mode or ("first" if self.default_point is not None else self.default_mode))
            threshold = opts.threshold if opts.threshold is not None else self.default_threshold
            if threshold is None:
                self.reset_threshold()
            else:
                self.configure(threshold=threshold)
        self._t_start = time.monotonic()
        result = super().create_completion(prompt, **kwargs)
        if isinstance(result, dict):
            return {**result, "first": self.first_fields()}
        self._open = _tag_last(result, self.first_fields)
        return self._open

    def _chat_with_first(self, handler):
        def chat(**kwargs: Any):
            result = handler(**kwargs)  # calls create_completion, which applies the request's settings
            if isinstance(result, dict):
                return {**result, "first": self.first_fields()}
            return _tag_last(result, self.first_fields)

        return chat

    def first_fields(self) -> dict:
        """The ``first`` object of the generation that ran last."""
        rep = self.last_prefill
        return {"mode": rep.mode, "point": rep.point, "threshold": rep.threshold, "n_layer": len(rep.mask),
                "skipped": list(rep.skipped), "probs": list(rep.probs) if rep.probs is not None else None,
                "thin": list(rep.thin), "vocab": rep.vocab is not None, "warmup": rep.warmup, "n_tokens": rep.n_tokens, "n_evaluated": rep.n_evaluated,
                "t_start": self._t_start, "t_end": time.monotonic(),
                "draft": self.draft_model.stats.row() if hasattr(self.draft_model, "stats") else None}


def _tag_last(chunks: Iterator[dict], fields) -> Iterator[dict]:
    """The chunks, the last one (it has a finish_reason) with the ``first`` object added."""
    try:
        for chunk in chunks:
            if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is not None:
                chunk = {**chunk, "first": fields()}
            yield chunk
    finally:
        chunks.close()


class RequestError(FirstError):
    """A request the server refuses: an HTTP status and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


def request_options(raw: dict, llm: FirstModel, aliases: list[str]) -> RequestOptions:
    """Check a request body's ``model`` and FiRST fields.

    Raises:
        RequestError: 404 for an unknown model, 400 for a bad ``first_mode`` or ``first_threshold``.
    """
    model = raw.get("model")
    if model is not None and model not in aliases:
        raise RequestError(404, f"The model `{model}` does not exist; this server has {', '.join(aliases)}",
                           "model", "model_not_found")
    mode, threshold = raw.get("first_mode"), raw.get("first_threshold")
    if mode is not None and mode not in ("first", "full"):
        raise RequestError(400, f"first_mode must be 'first' or 'full', not {mode!r}", "first_mode")
    if mode == "first" and not llm.has_routers:
        raise RequestError(400, "first_mode 'first' needs routers; this model is a plain GGUF", "first_mode")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise RequestError(400, f"first_threshold must be a number in [0, 1], not {threshold!r}",
                               "first_threshold")
        threshold = float(threshold)
    if raw.get("logprobs") not in (None, False) and not llm.logprobs_ok:
        raise RequestError(400, "logprobs with a draft model need FirstModel(..., logits_all=True); this server "
                                "verifies drafts without keeping every position's logits", "logprobs")
    return RequestOptions(mode, threshold)


class _Prompt(Exception):
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens


class _PromptProbe:
    """Stands in for the model while its chat handler formats a request: keeps the prompt, runs nothing."""

    def __init__(self, llm: FirstModel) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, prompt, **_: Any):
        raise _Prompt(prompt)


def prompt_length(llm: FirstModel, body: dict) -> int:
    """Tokens of the prompt a chat or completion request makes (the chat template applied), without the lock.

    Only the model's vocabulary is read (tokenization is thread-safe in llama.cpp), so this
    runs while another request generates.
    """
    from llama_cpp import Llama

    if "messages" in body:
        keys = ("messages", "functions", "function_call", "tools", "tool_choice", "response_format")
        try:
            Llama.create_chat_completion(_PromptProbe(llm), **{k: body[k] for k in keys if body.get(k) is not None})
        except _Prompt as p:
            return len(p.tokens)
        raise FirstError("the chat handler made no prompt")  # pragma: no cover (every handler calls create_completion)
    prompt = body.get("prompt") or ""
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return len(llm.tokenize(str(prompt).encode("utf-8"), add_bos=True, special=True)) if prompt else 1


def check_prompt_fits(llm: FirstModel, body: dict) -> None:
    """Raise the runtime's own context error (llama-cpp-python's server answers it with a 400)."""
    n = prompt_length(llm, body)
    if n >= llm.n_ctx():
        raise ValueError(f"Requested tokens ({n}) exceed context window of {llm.n_ctx()}")


@contextlib.contextmanager
def _using_proxy(proxy_cls):
    """llama-cpp-python's ``create_app`` builds its model proxy by name: hand it ours for that call."""
    from llama_cpp.server import app as server_app

    saved, server_app.LlamaProxy = server_app.LlamaProxy, proxy_cls
    try:
        yield
    finally:
        server_app.LlamaProxy = saved


# --- the app ---------------------------------------------------------------------------

def _settings_classes():
    """Their server and model settings, filled from our arguments only (pydantic-settings would read
    the environment: N_CTX, API_KEY, ...), the model's with the server's FiRST defaults."""
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    def arguments_only(cls, settings_cls, init_settings, *_, **__):
        return (init_settings,)

    class FirstServerSettings(ServerSettings):
        settings_customise_sources = classmethod(arguments_only)

    class FirstModelSettings(ModelSettings):
        first_mode: str | None = None
        first_threshold: float | None = None
        first_point: str | None = None
        first_draft: str | None = None
        first_draft_point: str | None = None
        first_draft_tokens: int = 4
        settings_customise_sources = classmethod(arguments_only)

    return FirstServerSettings, FirstModelSettings


def _proxy_class():
    from llama_cpp.server.model import LlamaProxy

    class FirstProxy(LlamaProxy):
        """Their model proxy, loading a ``ServedModel`` and refusing a model it does not have."""

        def __call__(self, model: str | None = None):
            if model is not None and model not in self._model_settings_dict:
                raise RequestError(404, f"The model `{model}` does not exist", "model", "model_not_found")
            return super().__call__(model)

        @staticmethod
        def load_llama_from_model_settings(settings) -> ServedModel:
            from .shipped import open_draft

            common = dict(n_ctx=settings.n_ctx, n_threads=settings.n_threads, n_threads_batch=settings.n_threads_batch,
                          n_gpu_layers=settings.n_gpu_layers)
            draft = open_draft(settings.first_draft, settings.first_draft_point, settings.first_draft_tokens, **common)
            return ServedModel(settings.model, mode=settings.first_mode, threshold=settings.first_threshold,
                               point=settings.first_point, draft_model=draft,
                               n_batch=settings.n_batch, n_ubatch=settings.n_ubatch, seed=settings.seed,
                               chat_format=settings.chat_format, verbose=settings.verbose, **common)

    return FirstProxy


def _route_class():
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from llama_cpp.server.errors import RouteErrorHandler

    class RequestErrors(APIRoute):
        """A malformed body stays FastAPI's 422 and our checks keep their status; the rest goes on to theirs."""

        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request):
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    errors = jsonable_encoder(exc.errors())
                    first = errors[0] if errors else {}
                    where = ".".join(str(x) for x in first.get("loc", ()))
                    err = RequestError(422, f"invalid request: {where}: {first.get('msg', 'malformed body')}",
                                       where or None)
                    return JSONResponse({**err.body(), "detail": errors}, status_code=422)
                except RequestError as exc:
                    return JSONResponse(exc.body(), status_code=exc.status)

            return route

    # MRO: theirs (model errors -> OpenAI-style 400/500) wraps ours, which wraps FastAPI's
    class FirstRoute(RouteErrorHandler, RequestErrors):
        pass

    return FirstRoute


def _routes(llm: ServedModel, alias: str):
    """Our two generation endpoints: check the request, then run llama-cpp-python's own endpoint."""
    from fastapi import APIRouter, Depends, Request
    from llama_cpp.server import app as server_app
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    router = APIRouter(route_class=_route_class(), dependencies=[Depends(server_app.authenticate)])

    async def prepare(request: Request, stream: bool) -> None:
        raw = await request.json()
        opts = request_options(raw, llm, [alias])
        if stream:  # once the stream starts the status is 200: check what can fail before
            check_prompt_fits(llm, raw)
        _REQUEST.set(opts)  # read by ServedModel.create_completion, in the worker thread (context is copied)

    @router.post("/v1/chat/completions", summary="Chat (FiRST)", tags=["OpenAI V1"])
    async def chat_completions(request: Request, body: CreateChatCompletionRequest):
        await prepare(request, body.stream)
        body.model = alias  # responses name the model by its id, not by its path on this machine
        return await server_app.create_chat_completion(request, body)

    @router.post("/v1/completions", summary="Completion (FiRST)", tags=["OpenAI V1"])
    async def completions(request: Request, body: CreateCompletionRequest):
        await prepare(request, body.stream)
        body.model = alias
        return await server_app.create_completion(request, body)

    return router


def create_app(model: str | Path | None = None, *, alias: str | None = None, n_ctx: int = 4096,
               threads: int | None = None, mode: str | None = None, threshold: float | None = None,
               gpu_layers: int = 0, api_key: str | None = None, point: str | None = None,
               draft: str | Path | None = None, draft_point: str | None = None, draft_tokens: int = 4):
    """The FastAPI app: llama-cpp-python's, with a ``ServedModel`` and our generation endpoints.

    Args:
        model: a GGUF, a zoo name, or None (the default zoo model with its routers).
        alias: the model id clients name (default: the zoo name or the file name without .gguf).
        n_ctx: context size; threads: CPU threads (default: all cores); gpu_layers: layers
            offloaded (-1: all; a Metal or CUDA build).
        mode, threshold: the server's FiRST defaults (None: "first" for a FiRST-GGUF; the file's).
        api_key: if set, requests need it as a Bearer token.
        draft, draft_point, draft_tokens: a smaller model with the same vocabulary (file or zoo
            name) at a point, drafting tokens that MODEL verifies (``FirstDraft``).
    """
    import os

    try:
        from llama_cpp.server import app as server_app
    except ImportError as exc:
        raise FirstError(f"{SERVER_EXTRA} ({exc})") from None
    from .models import DEFAULT_MODEL, MODELS
    from .shipped import resolve_model

    if os.environ.get("CONFIG_FILE"):
        raise FirstError("CONFIG_FILE is set: first-gguf serve takes its settings from the command line; unset it")
    path = resolve_model(model)
    if alias is None:
        alias = str(model or DEFAULT_MODEL) if str(model or DEFAULT_MODEL) in MODELS else path.name.removesuffix(".gguf")
    threads = threads or os.cpu_count() or 1
    server_settings, model_settings = _settings_classes()
    # interrupt_requests=False: theirs would cut a stream short whenever another request waits
    server = server_settings(interrupt_requests=False, api_key=api_key)
    settings = model_settings(model=str(path), model_alias=alias, n_ctx=n_ctx, n_threads=threads,
                              n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=False, first_mode=mode,
                              first_threshold=threshold, first_point=point,
                              first_draft=None if draft is None else str(resolve_model(draft)),
                              first_draft_point=draft_point, first_draft_tokens=draft_tokens)
    with _using_proxy(_proxy_class()):
        app = server_app.create_app(server_settings=server, model_settings=[settings])
    llm = server_app._llama_proxy(alias)  # the proxy create_app made (a module global of theirs)
    n = len(app.router.routes)
    app.include_router(_routes(llm, alias))
    app.router.routes[:] = app.router.routes[n:] + app.router.routes[:n]  # ours match before theirs
    app.state.first_model, app.state.first_alias = llm, alias
    return app


def run_server(model: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", **options: Any) -> None:
    """Serve MODEL until interrupted (``create_app``'s options)."""
    import uvicorn

    app = create_app(model, **options)
    llm = app.state.first_model
    from .log import logger

    threshold = llm.threshold if llm.threshold is not None else "the file's"
    how = f"point {llm.point}" if llm.point is not None else f"mode {llm.mode}, threshold {threshold}"
    drafted = f", {llm.draft_model.describe()}" if hasattr(llm.draft_model, "describe") else ""
    logger("serve")(f"{Path(llm.model_path).name} as {app.state.first_alias!r}: {llm.n_layer} layers, {how}"
                    f"{drafted}; http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
