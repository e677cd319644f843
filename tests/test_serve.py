"""``first-gguf serve`` as a client sees it: a real server subprocess on loopback (the default
model, one thread, n_ctx 2048) and the ``openai`` client; the FiRST fields against FirstModel's
own decision; errors that leave the server serving; and a bounded load test."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai", reason="the test extra installs openai")
N_CTX = 2048
MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a string."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from first_gguf.models import DEFAULT_MODEL
    from first_gguf.serve_load import server_process

    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    # the routers (first mode at 0.5): these tests are about routed requests
    with open(log_path, "w") as log, server_process(threads=1, n_ctx=N_CTX, log=log,
                                                    extra=("--mode", "first", "--threshold", "0.5")) as base:
        yield base, DEFAULT_MODEL
    print(log_path.read_text()[-3000:])


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=300)


def _check_first(first: dict, mode: str = "first") -> None:
    assert first["mode"] == mode and first["n_layer"] == 24
    assert first["t_start"] <= first["t_end"]
    if mode == "first":
        assert len(first["probs"]) == 24 and 0.0 <= first["threshold"] <= 1.0
        assert first["skipped"] == [i for i, p in enumerate(first["probs"]) if p < first["threshold"] and 0 < i < 23]
    else:
        assert first["probs"] is None and first["skipped"] == []


def test_models_lists_the_default_model(client, server):
    assert [m.id for m in client.models.list().data] == [server[1]]


def test_chat_first_fields_are_firstmodels_own_decision(client, server):
    from first_gguf.shipped import resolve_model
    from first_gguf.runtime import FirstModel

    r = client.chat.completions.create(model=server[1], messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.model == server[1] and r.usage.completion_tokens <= 8
    first = r.model_extra["first"]
    _check_first(first)

    llm = FirstModel(resolve_model(None), n_ctx=N_CTX, n_threads=1, n_threads_batch=1, threshold=0.5)
    llm.create_chat_completion(MESSAGES, max_tokens=8, temperature=0)
    rep = llm.last_prefill
    assert first["n_tokens"] == rep.n_tokens
    # the server's cache may hold part of this prompt: another ubatch grouping, floats within 1e-4
    assert max(abs(a - b) for a, b in zip(first["probs"], rep.probs)) < 1e-4
    near = [i for i, p in enumerate(rep.probs) if abs(p - rep.threshold) < 1e-3]
    assert [i for i in first["skipped"] if i not in near] == [i for i in rep.skipped if i not in near]


def test_chat_stream_carries_first_in_its_last_chunk(client, server):
    chunks = list(client.chat.completions.create(model=server[1], messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert ["first" in (c.model_extra or {}) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    _check_first(chunks[-1].model_extra["first"])


@pytest.mark.parametrize("stream", [False, True])
def test_completions(client, server, stream):
    kw = dict(model=server[1], prompt="def fibonacci(n):", max_tokens=8, temperature=0)
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text, first = "".join(c.choices[0].text for c in chunks), chunks[-1].model_extra["first"]
    else:
        r = client.completions.create(**kw)
        text, first = r.choices[0].text, r.model_extra["first"]
    assert text
    _check_first(first)


def test_per_request_mode_and_threshold(client, server):
    def first_of(**extra):
        r = client.chat.completions.create(model=server[1], messages=MESSAGES, max_tokens=2, extra_body=extra)
        return r.model_extra["first"]

    _check_first(first_of(first_mode="full"), "full")
    assert first_of(first_threshold=0.0)["skipped"] == []
    every = first_of(first_threshold=1.0)
    assert every["threshold"] == 1.0 and len(every["skipped"]) >= 20
    assert first_of()["threshold"] == pytest.approx(0.5)  # the next request is back to the server's settings


def test_a_second_turn_evaluates_only_what_the_first_turns_prompt_did_not_cover(client, server):
    """Multi-turn through the server: the cached first prompt is reused; the first answer is not.

    In ``first`` mode every reused position must carry its router sums, and decoded positions
    carry none (docs/FORMAT.md section 3), so the second prefill starts exactly where the first
    turn's prompt ended: its answer is evaluated again, at full depth, with the new question.
    """
    ask = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    r1 = client.chat.completions.create(model=server[1], messages=ask, max_tokens=12, temperature=0)
    f1 = r1.model_extra["first"]
    ask += [{"role": "assistant", "content": r1.choices[0].message.content},
            {"role": "user", "content": "Now make it add three numbers."}]
    f2 = client.chat.completions.create(model=server[1], messages=ask, max_tokens=2, temperature=0).model_extra["first"]
    assert f2["n_tokens"] > f1["n_tokens"] + r1.usage.completion_tokens // 2
    assert f2["n_evaluated"] == f2["n_tokens"] - f1["n_tokens"]
    _check_first(f2)


def _post(base: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_errors_are_4xx_and_the_server_keeps_serving(client, server):
    base, model = server
    long_prompt = "hello " * (N_CTX + 100)

    def still_serving():
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")

    for body, status in [(b"{not json", 422), (b'{"messages": 3}', 422), (b"[1, 2]", 422)]:
        code, payload = _post(base, body)
        assert code == status and payload["error"]["message"], payload
        still_serving()
    cases = [
        (openai.NotFoundError, "does not exist", dict(model="gpt-4", messages=MESSAGES)),
        (openai.BadRequestError, "maximum context length",
         dict(model=model, messages=[{"role": "user", "content": long_prompt}])),
        (openai.BadRequestError, "maximum context length",
         dict(model=model, messages=[{"role": "user", "content": long_prompt}], stream=True)),
        (openai.BadRequestError, "first_threshold", dict(model=model, messages=MESSAGES,
                                                         extra_body={"first_threshold": 1.5})),
        (openai.BadRequestError, "first_threshold", dict(model=model, messages=MESSAGES,
                                                         extra_body={"first_threshold": "high"})),
        (openai.BadRequestError, "first_mode", dict(model=model, messages=MESSAGES,
                                                    extra_body={"first_mode": "fast"})),
    ]
    for error, text, kw in cases:
        with pytest.raises(error, match=text):
            out = client.chat.completions.create(max_tokens=2, **kw)
            list(out) if kw.get("stream") else out
        still_serving()
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=model, prompt=long_prompt, max_tokens=2, stream=True)
    still_serving()


def test_a_client_that_leaves_mid_stream(client, server):
    """The stream it left is ended before the next generation: the next prefill is a clean one."""
    stream = client.chat.completions.create(model=server[1], messages=MESSAGES, max_tokens=200, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    r = client.chat.completions.create(model=server[1], messages=MESSAGES, max_tokens=4, temperature=0)
    first = r.model_extra["first"]
    _check_first(first)
    assert first["n_tokens"] == r.usage.prompt_tokens  # routed over the whole prompt, nothing half-done


def test_load_64_requests_from_8_clients_one_at_a_time(server):
    from first_gguf.serve_load import run_load

    base, model = server
    # 8 requests per client: every client waits on the lock behind the others several times
    result = run_load(base, model, n_requests=64, concurrency=8, max_tokens=6)
    assert result.errors == [], result.errors[:5]
    assert len(result.latencies) == len(result.firsts) == 64
    for first in result.firsts:
        _check_first(first)
    # the server's lock: no two generations (streamed or not) overlap on its clock
    spans = sorted((f["t_start"], f["t_end"]) for f in result.firsts)
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert not overlaps, overlaps[:3]
    print(f"{result.rps:.2f} req/s, p50 {result.percentile(50):.2f} s, p99 {result.percentile(99):.2f} s")


def test_api_key_guards_our_endpoints_too():
    from starlette.testclient import TestClient

    from first_gguf.serve import create_app

    app = TestClient(create_app(threads=1, n_ctx=256, api_key="secret"))
    body = {"messages": MESSAGES, "max_tokens": 1}
    for path, payload in [("/v1/chat/completions", body), ("/v1/completions", {"prompt": "x", "max_tokens": 1})]:
        assert app.post(path, json=payload).status_code == 401
        assert app.post(path, json=payload, headers={"Authorization": "Bearer secret"}).status_code == 200


def test_the_files_default_point_serves_without_a_point_option(tmp_path):
    from first_gguf.models import DEFAULT_MODEL
    from first_gguf.serve_load import server_process

    with open(tmp_path / "server.log", "w") as log, server_process(threads=1, n_ctx=512, log=log) as base:
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=300)
        r = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
        first = r.model_extra["first"]
        got = (first["point"], first["mode"], first["skipped"], first["vocab"])
        assert got == ("fast-quality-short", "mask", [4], True)
        r = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=2,
                                           extra_body={"first_mode": "full"})
        assert r.model_extra["first"]["mode"] == "full" and r.model_extra["first"]["point"] is None


def test_a_served_model_with_a_draft_reports_what_it_kept():
    """create_app(draft=...): completions verify the draft's tokens; ``first.draft`` counts them;
    logprobs, which a draft's verification does not keep, are a 4xx, not wrong numbers."""
    from starlette.testclient import TestClient

    from first_gguf.models import DEFAULT_MODEL
    from first_gguf.serve import create_app

    app = TestClient(create_app(threads=1, n_ctx=512, point="short", draft=DEFAULT_MODEL, draft_tokens=3))
    r = app.post("/v1/completions", json={"prompt": "def add(a, b):\n", "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    draft = r.json()["first"]["draft"]
    assert draft["calls"] > 0 and 0 < draft["accepted"] <= draft["drafted"] <= 3 * draft["calls"]
    r = app.post("/v1/completions", json={"prompt": "def add(a, b):\n", "max_tokens": 4, "logprobs": 2})
    assert 400 <= r.status_code < 500 and "logits_all" in r.text, r.text
