"""The OpenAI-compatible server (`lmlab.serve.server`), talked to by OpenAI's own client.

A real server process on the tiny chat model, its key from LMLAB_API_KEY: answers equal
the in-process engine's (greedy text, logprobs, usage counted as the tokenizer counts);
streamed text equals plain text; n choices are seeds seed+i; stop strings cut; every
failure is OpenAI's error body and the client's matching exception class; a client that
goes away frees its slot within a step; /metrics parses as Prometheus text; fuzzed bodies
never get a 500 nor hang it. In-process (`TestClient`): loading (503), a full queue (429),
an engine failing mid-stream, answers from documents (`sources`), the web page's files, and
`run_server` refusing a directory it cannot serve.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import lmlab
from lmlab.data.chat import prompt_ids
from lmlab.errors import InputError
from lmlab.infer.engine import Engine, SamplingParams
from lmlab.rag import DocIndex
from lmlab.rag.answer import prompt_budget
from lmlab.serve.server import STATIC, create_app, run_server
from tests.conftest import ServerProcess

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "用一句话介绍北京, then print('hi') 🙂"}]
ERROR_KEYS = {"message", "type", "param", "code"}


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def servers(chat_model_dir, long_chat_model_dir, tmp_path_factory):
    """Two server processes, started together, their key from the environment (as a user
    sets it): the chat model as it is (context 256), and its 4096-token copy, whose answers
    run for seconds, so that a client can leave in the middle of one."""
    tmp = tmp_path_factory.mktemp("server")
    env = {"LMLAB_API_KEY": KEY}
    procs = [ServerProcess(chat_model_dir, tmp / "server.log", env, max_batch=4, max_queue=16),
             ServerProcess(long_chat_model_dir, tmp / "long-server.log", env, max_batch=2)]
    try:
        yield {"main": procs[0].wait_healthy(), "long": procs[1].wait_healthy()}
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def server(servers) -> str:
    return servers["main"]


@pytest.fixture(scope="module")
def model(chat_model_dir) -> str:
    return chat_model_dir.name  # the id /v1/models gives


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(chat_model_dir):
    return lmlab.load(chat_model_dir)


@pytest.fixture(scope="module")
def reference(lm) -> Engine:
    """The engine in this process, stepped in this thread: what the server must answer."""
    return Engine(lm.model, lm.tokenizer)


def metrics(base: str) -> dict[str, dict[tuple, float]]:
    """/metrics as {sample name: {sorted label items: value}}."""
    r = httpx.get(base + "/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def error_of(response: httpx.Response) -> dict:
    """The error object of a failed response, checked to be OpenAI's shape."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def sse(text: str) -> list:
    """The data of each server-sent event; the last must be [DONE]."""
    data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", text[-300:]
    return [json.loads(d) for d in data[:-1]]


# ------------------------------------------------------------------ answers

@pytest.mark.slow
def test_chat_equals_the_engine(client, model, lm, reference):
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                       max_tokens=12, logprobs=True, top_logprobs=3)
    ids = prompt_ids(lm.tokenizer, MESSAGES)
    ref = reference.generate([ids], SamplingParams(max_tokens=12, temperature=0,
                                                   logprobs=True))[0]
    (choice,) = r.choices
    assert (r.object, r.model, choice.message.role) == ("chat.completion", model, "assistant")
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == ref.completion_tokens == len(choice.logprobs.content)
    assert r.usage.total_tokens == len(ids) + ref.completion_tokens
    got = [t.logprob for t in choice.logprobs.content]
    assert got == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    for t in choice.logprobs.content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        tops = [a.logprob for a in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and t.logprob <= tops[0] + 1e-6


@pytest.mark.slow
def test_stream_equals_plain(client, model):
    kw = dict(model=model, messages=MESSAGES, temperature=0, max_tokens=16)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


@pytest.mark.slow
def test_n_choices_are_seeds_in_turn(client, model):
    kw = dict(model=model, messages=MESSAGES, temperature=1.0, max_tokens=8)
    r = client.chat.completions.create(**kw, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    for i in range(3):  # choice i is what seed 7 + i gives alone
        alone = client.chat.completions.create(**kw, seed=7 + i)
        assert alone.choices[0].message.content == texts[i]
    assert len(set(texts)) > 1
    streamed = ["", "", ""]
    for c in client.chat.completions.create(**kw, n=3, seed=7, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == texts


@pytest.mark.slow
def test_stop_string_cuts_the_text(client, model):
    kw = dict(model=model, messages=MESSAGES, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) >= 8, full
    stop = full[len(full) // 2:len(full) // 2 + 2]  # from the greedy text: it surely occurs
    want = full[:full.find(stop)]
    r = client.chat.completions.create(**kw, stop=[stop, "不会出现的停止串"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
    streamed = client.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want


@pytest.mark.slow
def test_completions(client, model, lm, reference):
    prompts = ["def add(a, b):", "北京是"]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0,
                                  n=2, logprobs=2)
    ids = [lm.tokenizer.encode(p) for p in prompts]
    refs = reference.generate(ids, SamplingParams(max_tokens=6, temperature=0))
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [refs[0].text] * 2 + [refs[1].text] * 2
    assert r.usage.prompt_tokens == sum(map(len, ids))
    assert r.usage.completion_tokens == 2 * sum(c.completion_tokens for c in refs)
    for c, ref in zip(r.choices, [refs[0], refs[0], refs[1], refs[1]]):
        assert len(c.logprobs.tokens) == ref.completion_tokens
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    streamed = client.completions.create(model=model, prompt=prompts[1], max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == refs[1].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", echo=True)
    assert e.value.body["param"] == "echo"


@pytest.mark.slow
def test_tokenize_counts_what_generation_uses(server, model, lm):
    text = "def f(x):\n    return '你好' 🙂"
    r = httpx.post(server + "/tokenize", json={"text": text}, headers=AUTH)
    assert r.json()["tokens"] == lm.tokenizer.encode(text) and r.json()["count"] > 0
    r = httpx.post(server + "/tokenize", json={"messages": MESSAGES, "model": model},
                   headers=AUTH)
    assert r.json()["tokens"] == prompt_ids(lm.tokenizer, MESSAGES)
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 256
    assert httpx.post(server + "/tokenize", json={"text": text}).status_code == 401
    both = httpx.post(server + "/tokenize", json={"text": text, "messages": MESSAGES},
                      headers=AUTH)
    assert both.status_code == 400 and error_of(both)["param"] == "text"


@pytest.mark.slow
def test_models(client, model):
    assert [m.id for m in client.models.list().data] == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# ------------------------------------------------------------------ failures

@pytest.mark.slow
def test_errors_have_openai_shape_and_class(server, client, model):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(server + "/v1/chat/completions", json={"model": model, "messages": MESSAGES})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(server + "/health").status_code == 200  # open without a key

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (e.value.body["code"], e.value.body["param"]) == ("model_not_found", "model")

    bad = [({"temperature": 5}, "temperature"), ({"n": 0}, "n"), ({"top_p": 0}, "top_p"),
           ({"messages": []}, "messages"), ({"top_logprobs": 30}, "top_logprobs"),
           ({"stop": [""]}, "stop"), ({"max_tokens": 0}, "max_tokens"),
           ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
           ({"messages": [{"role": "user", "content": "很长" * 600}]}, "messages"),
           ({"top_logprobs": 2}, "top_logprobs")]  # top_logprobs without logprobs
    for fields, param in bad:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 2, **fields}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**body)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (fields, e.value.body)
        assert set(e.value.body) == ERROR_KEYS
    too_long = httpx.post(server + "/v1/chat/completions", headers=AUTH, json={
        "model": model, "messages": [{"role": "user", "content": "很长" * 600}]})
    assert "max_seq_len=256" in error_of(too_long)["message"]

    for r in (httpx.post(server + "/v1/chat/completions", headers=AUTH, content=b"{not json"),
              httpx.post(server + "/v1/chat/completions", content=b'{"model": 1',
                         headers={**AUTH, "Content-Type": "application/json"}),
              httpx.get(server + "/v1/nothing-here", headers=AUTH),
              httpx.get(server + "/v1/chat/completions", headers=AUTH)):
        assert r.status_code in (400, 404, 405) and error_of(r)


def _running(base: str) -> float:
    return metrics(base)["lmlab_running_requests"][()]


def _cancelled(base: str) -> float:
    return metrics(base).get("lmlab_generations_finished_total", {}).get(
        (("finish_reason", "cancelled"),), 0.0)


def _slot_freed_after(base: str, leave) -> float:
    """Seconds from `leave()` (a client going away mid-answer) until no row runs."""
    before = _cancelled(base)
    leave()
    t0 = time.monotonic()
    while _running(base) > 0:
        assert time.monotonic() - t0 < 10, "the generation went on after its client left"
        time.sleep(0.02)
    assert _cancelled(base) == before + 1  # cut off, not finished
    return time.monotonic() - t0


@pytest.mark.slow
def test_a_client_that_leaves_frees_its_slot(servers, model):
    base = servers["long"]  # 4000 tokens would take ~10 s here
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True}

    def stream_and_leave() -> None:
        with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True},
                          headers=AUTH, timeout=30) as r:
            assert r.status_code == 200, r.read()
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            for _ in range(4):
                next(lines)
            assert _running(base) == 1

    def wait_and_leave() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/chat/completions", json=body, headers=AUTH,
                       timeout=httpx.Timeout(10, read=0.5))

    # measured here: 0.2-0.3 s, most of it /metrics polls under load; the answer would
    # have run for 4000 tokens (≥ 8 s), and a cancelled one is counted as such
    assert _slot_freed_after(base, stream_and_leave) < 2.0
    assert _slot_freed_after(base, wait_and_leave) < 2.0


@pytest.mark.slow
def test_metrics_parse(server, client, model):
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
    httpx.get(server + "/v1/models")  # a 401
    m = metrics(server)
    assert m["lmlab_time_to_first_token_seconds_count"][()] >= 1
    assert m["lmlab_time_per_output_token_seconds_count"][()] >= 1
    assert m["lmlab_time_to_first_token_seconds_sum"][()] > 0
    assert m["lmlab_queue_depth"][()] == 0 and m["lmlab_max_batch"][()] == 4
    assert m["lmlab_running_requests"][()] == 0
    assert m["lmlab_generation_tokens_total"][()] >= 4
    http = m["lmlab_http_requests_total"]
    assert http[(("endpoint", "/v1/chat/completions"), ("status", "200"))] >= 1
    assert http[(("endpoint", "/v1/models"), ("status", "401"))] >= 1
    assert httpx.get(server + "/metrics").status_code == 401


# ------------------------------------------------------------------ fuzzing

FIELDS = ["model", "messages", "prompt", "stream", "stream_options", "n", "stop", "seed",
          "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
          "top_logprobs", "user", "echo", "suffix", "text"]
NUMERIC = ["n", "seed", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "top_logprobs",
           "logprobs"]
EDGES = [10**30, -(10**30), 2**63, 2**64 - 1, 1e308, -1, 0, 0.5, float("nan"), float("inf")]
TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["", "你好，世界", "🙂👍", "\ud800", "<|im_end|>", "\x00", "é" * 50])
NUMBER = st.integers() | st.integers(-3, 300) | st.floats() | st.sampled_from(EDGES)
SCALAR = st.none() | st.booleans() | NUMBER | TEXT
JSON = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(TEXT, kids, max_size=3), max_leaves=6)
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]) | JSON,
    "content": TEXT | JSON | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                             "text": TEXT}), max_size=2)})
VALUE = JSON | st.lists(MESSAGE, max_size=3)


@st.composite
def request_bodies(draw, model: str) -> tuple[str, bytes]:
    """(path, body): a valid request with a few fields replaced by anything, deleted or
    added; or a body that is any JSON at all, or not JSON."""
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize"]))
    kind = draw(st.sampled_from(["mutated"] * 8 + ["json", "bytes"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=40) | st.just(b'{"model": "\xff\xfe"}'))
    if kind == "json":
        return path, json.dumps(draw(JSON)).encode()
    body = {"model": model, "max_tokens": 2, "max_completion_tokens": 2,
            **({"messages": [{"role": "user", "content": "你好"}]} if path != "/v1/completions"
               else {"prompt": "def"})}
    if path == "/tokenize" and draw(st.booleans()):
        body = {"text": "你好 world"}
    for name in draw(st.sets(st.sampled_from(sorted(body)), max_size=1)):
        del body[name]
    body.update(draw(st.dictionaries(st.sampled_from(FIELDS), VALUE, max_size=3)))
    body.update(draw(st.dictionaries(TEXT, JSON, max_size=2)))
    return path, json.dumps(body, ensure_ascii=True).encode()  # NaN, lone surrogates allowed


@pytest.mark.slow
def test_fuzzed_requests_never_fail_the_server(server, client, model):
    http = httpx.Client(base_url=server, headers={**AUTH, "Content-Type": "application/json"},
                        timeout=60)  # a hung connection fails the test

    @settings(max_examples=100, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(request_bodies(model))
    def check(case: tuple[str, bytes]) -> None:
        path, body = case
        r = http.post(path, content=body)
        assert r.status_code in (200, 400, 404, 429), (r.status_code, r.text[:500], body[:300])
        if r.status_code != 200:
            error_of(r)
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert all("choices" in event for event in sse(r.text)), r.text[-500:]
        else:
            assert "choices" in r.json() or "tokens" in r.json(), r.text[:500]

    for name in NUMERIC:  # every number field at the edges, beside what hypothesis draws
        for value in EDGES:
            body = {"model": model, "messages": [{"role": "user", "content": "你好"}],
                    "prompt": "def", "max_tokens": 2, "max_completion_tokens": 2, name: value}
            for path in ("/v1/chat/completions", "/v1/completions"):
                assert http.post(path, content=json.dumps(body)).status_code != 500, body
    check()
    assert httpx.get(server + "/health").status_code == 200
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    deadline = time.monotonic() + 10
    while _running(server) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ------------------------------------------------------------------ in process

def test_health_is_503_while_loading(lm, model):
    ready = threading.Event()
    app = create_app(None, model_name=model, api_key=KEY, ready=ready)
    c = TestClient(app, raise_server_exceptions=False)
    r = c.get("/health")
    assert (r.status_code, r.json()) == (503, {"status": "loading"})
    r = c.get("/v1/models", headers=AUTH)
    assert r.status_code == 503 and error_of(r)["code"] == "model_not_loaded"
    with Engine(lm.model, lm.tokenizer) as engine:
        app.state.engine = engine
        assert c.get("/health").status_code == 503  # not until ready
        ready.set()
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == model


def test_queue_full_is_429(lm, model):
    engine = Engine(lm.model, lm.tokenizer, max_batch=1, max_queue=0)  # not started
    c = TestClient(create_app(engine, model_name=model), raise_server_exceptions=False)
    r = c.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "n": 2})
    assert r.status_code == 429 and error_of(r)["code"] == "queue_full"
    assert engine.stats()["queue_depth"] == 1  # the first choice, cancelled
    assert not engine.step() and engine.stats()["queue_depth"] == 0


def test_engine_failure_mid_stream_is_an_event(chat_model_dir, model):
    broken = lmlab.load(chat_model_dir)

    def fail(*_):
        raise RuntimeError("the accelerator fell off")

    broken.model.decode_slots = fail  # the prefill works: a first token, then the failure
    with Engine(broken.model, broken.tokenizer) as engine:
        c = TestClient(create_app(engine, model_name=model), raise_server_exceptions=False)
        body = {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
        events = sse(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert set(events[-1]) == {"error"} and set(events[-1]["error"]) == ERROR_KEYS
        assert "fell off" in events[-1]["error"]["message"]
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 500 and "fell off" in error_of(r)["message"]
        assert r.json()["error"]["type"] == "server_error"


def test_answers_from_documents_carry_sources(lm, model, tmp_path):
    beijing = "# 北京\n\n北京是中国的首都，有故宫和长城。\n"
    (tmp_path / "beijing.md").write_text(beijing, encoding="utf-8")
    (tmp_path / "python.md").write_text("# Python\n\nLists are mutable sequences.\n")
    index = DocIndex.build(tmp_path, chinese="chars")
    question = [{"role": "user", "content": "中国的首都是哪里？"}]
    augmented, sources = index.augment(question, tokenizer=lm.tokenizer,
                                       max_prompt_tokens=prompt_budget(lm.model, 3))
    assert sources and sources[0]["source"] == "beijing.md"
    with Engine(lm.model, lm.tokenizer) as engine:
        c = TestClient(create_app(engine, model_name=model, retriever=index))
        body = {"model": model, "messages": question, "max_tokens": 3, "temperature": 0}
        r = c.post("/v1/chat/completions", json=body).json()
        assert r["sources"] == sources
        assert r["usage"]["prompt_tokens"] == len(prompt_ids(lm.tokenizer, augmented))
        events = sse(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
        assert events[0]["sources"] == sources
        assert all("sources" not in e for e in events[1:])
        no_question = c.post("/v1/chat/completions", json={
            **body, "messages": [{"role": "system", "content": "你好"}]})
        assert no_question.status_code == 400 and error_of(no_question)["param"] == "messages"


def test_unexpected_failure_is_a_500_with_a_message(lm, model):
    class Broken:
        def augment(self, messages, **_):
            raise RuntimeError("the index is on fire")

    with Engine(lm.model, lm.tokenizer) as engine:
        c = TestClient(create_app(engine, model_name=model, retriever=Broken()),
                       raise_server_exceptions=False)
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES,
                                                     "stream": stream})
            assert r.status_code == 500 and error_of(r)["type"] == "server_error"
            assert "RuntimeError: the index is on fire" in error_of(r)["message"]


def test_run_server_refuses_what_it_cannot_serve(tmp_path, chat_model_dir):
    with pytest.raises(InputError, match="config.json"):
        run_server(tmp_path, port=0)  # not a model directory: at once, before listening
    broken = tmp_path / "broken"
    shutil.copytree(chat_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="model.safetensors"):  # found by the loading thread
        run_server(broken, port=0, log_level="critical")


@pytest.mark.skipif(not (STATIC / "index.html").is_file(), reason="the web page is not there")
def test_web_page_is_served_without_a_key(lm, model):
    with Engine(lm.model, lm.tokenizer) as engine:
        c = TestClient(create_app(engine, model_name=model, api_key=KEY))
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert page.headers["cache-control"] == "no-cache"
        assert page.text == (STATIC / "index.html").read_text(encoding="utf-8")
        for f in (f for f in STATIC.iterdir() if f.is_file()):
            assert c.get(f"/{f.name}").status_code == 200
            assert c.get(f"/static/{f.name}").status_code == 200
        missing = c.get("/static/nothing.js")
        assert missing.status_code == 404 and error_of(missing)
        assert c.post("/v1/chat/completions", json={}).status_code == 401
