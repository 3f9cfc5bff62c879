"""`kolora serve`: the OpenAI-compatible API through the official `openai` client, its 4xx answers,
and the web chat page driven in headless Chromium."""

import contextlib
import copy
import itertools
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT, TINY_TRAIN, run_cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

DEFAULT_TOKENS = 24  # the server's --max-new-tokens: short answers keep the tests fast
CAP = 40  # the server's --max-tokens-cap
QUESTION = "전세권의 존속기간은 얼마인가요?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_run(tiny_models, small_csv, tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "tiny-llama"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run),
                *TINY_TRAIN)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def server(tiny_run):
    """`kolora serve` in a subprocess, as a user starts it (default host: 127.0.0.1)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kolora", "serve", str(tiny_run), "--port", str(port),
                             "--max-new-tokens", str(DEFAULT_TOKENS), "--max-tokens-cap", str(CAP)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kolora serve exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("kolora serve did not answer within 180 s")
    yield SimpleNamespace(url=url, name=tiny_run.name, run=tiny_run)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, server, question=QUESTION, **kwargs):
    return client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": question}],
                                          **kwargs)


# --------------------------------------------------------------------------- the API
def test_models_lists_the_run(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.name]
    assert client.models.retrieve(server.name).id == server.name


def test_answers_like_kolora_chat(client, server):
    """Same prompt format and decoding as `kolora chat`: greedy answers are identical."""
    from kolora.data import Example
    from kolora.generation import GenConfig, generate_batched, load_tuned
    from kolora.runs import open_run

    reply = ask(client, server)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == server.name
    assert 0 < reply.usage.completion_tokens <= DEFAULT_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    model, tokenizer, cfg = load_tuned(open_run(str(server.run)))
    rows, _ = generate_batched(model, tokenizer, cfg, [Example(QUESTION, "")], GenConfig(max_new_tokens=DEFAULT_TOKENS))
    texts = [r.text for r in rows]
    assert choice.message.content == texts[0]


def test_streaming_matches_non_streaming(client, server):
    full = ask(client, server).choices[0].message.content
    pieces, finish, usage = [], None, None
    for chunk in ask(client, server, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces).strip() == full
    assert len(pieces) > 1, "the answer came in one piece: not streamed"
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_stop_sequence_cuts_the_answer(client, server):
    full = ask(client, server).choices[0].message.content
    stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1)
                if not any(c.isspace() or c == "\ufffd" for c in full[i:i + 2]))
    assume = full.index(stop)
    reply = ask(client, server, stop=[stop])
    assert reply.choices[0].message.content == full[:assume].rstrip()
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, server, stop=stop, stream=True)
                       if c.choices)
    assert streamed.strip() == full[:assume].strip()


def test_max_tokens_is_capped(client, server):
    reply = ask(client, server, max_tokens=100_000)
    assert reply.usage.completion_tokens <= CAP
    short = ask(client, server, max_tokens=3)
    assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason == "length"


def test_history_and_system_prompt_reach_the_prompt(loaded, monkeypatch):
    """The ids handed to generation are exactly `kolora chat`'s prompt for this system prompt,
    history and question (text parts joined), not just the last question."""
    from kolora.data import Example
    from kolora.prompt import encode_prompt

    fake = FakeGeneration(loaded.tokenizer, steps=2, delay=0)
    monkeypatch.setattr("kolora.serve.generate_details", fake)
    messages = [
        {"role": "system", "content": "간단히 답하세요."},
        {"role": "user", "content": "전세권이란?"},
        {"role": "assistant", "content": "전세금을 지급하고 부동산을 사용하는 권리입니다."},
        {"role": "user", "content": [{"type": "text", "text": "존속기간"}, {"type": "text", "text": "은요?"}]},
    ]
    with live(loaded) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    [prompt] = fake.prompts
    expected = Example("존속기간은요?", "", history=[{"role": "user", "content": "전세권이란?"},
                                                    {"role": "assistant", "content": messages[2]["content"]}],
                       system="간단히 답하세요.")
    cfg = loaded.cfg.data
    assert prompt == encode_prompt(loaded.tokenizer, expected, cfg.system_prompt, cfg.template)
    text = loaded.tokenizer.decode(prompt, skip_special_tokens=True)
    at = [text.index(part) for part in ("간단히 답하세요.", "전세권이란?", messages[2]["content"], "존속기간은요?")]
    assert at == sorted(at), text


@pytest.mark.parametrize("kwargs, error, status", [
    (dict(messages=[]), "UnprocessableEntityError", 422),
    (dict(messages=[{"role": "assistant", "content": "hi"}]), "BadRequestError", 400),
    (dict(messages=[{"role": "user", "content": "   "}]), "BadRequestError", 400),
    (dict(messages=[{"role": "tool", "content": "x"}]), "UnprocessableEntityError", 422),
    (dict(messages=[{"role": "user", "content": "q"}], temperature=7), "UnprocessableEntityError", 422),
    (dict(messages=[{"role": "user", "content": "q"}], max_tokens=0), "UnprocessableEntityError", 422),
    (dict(messages=[{"role": "user", "content": "q"}], n=2), "BadRequestError", 400),
    (dict(messages=[{"role": "user", "content": "q"}], model="gpt-4o"), "NotFoundError", 404),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "BadRequestError", 400),
    (dict(messages=[{"role": "user", "content": "q"}], stop=["a", "b", "c", "d", "e"]), "BadRequestError", 400),
    (dict(messages=[{"role": "user", "content": "q"}], stop="x" * 65), "BadRequestError", 400),
    (dict(messages=[{"role": "user", "content": "q"}], stop=["ok", "가" * 20_000]), "BadRequestError", 400),
])
def test_bad_requests_get_a_clear_4xx(client, server, kwargs, error, status):
    kwargs.setdefault("model", server.name)
    with pytest.raises(getattr(openai, error)) as caught:
        client.chat.completions.create(**kwargs)
    assert caught.value.status_code == status
    body = caught.value.response.json()
    assert body["error"]["message"] and body["error"]["type"]


def test_malformed_and_oversized_bodies(server):
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = {"messages": [{"role": "user", "content": "가" * 40_000}]}  # ~120 KB in UTF-8, over the 64 KB limit
    r = httpx.post(url, json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(100):
            yield b" " * 1024
    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.url + "/v1/nothing").status_code == 404


def test_binds_loopback_by_default_and_refuses_a_busy_port(tiny_run):
    from kolora.cli import build_parser

    assert build_parser().parse_args(["serve", "runs/x"]).host == "127.0.0.1"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_cli("serve", str(tiny_run), "--port", str(busy.getsockname()[1]), timeout=60)
    assert r.returncode == 2
    assert "cannot listen" in r.stderr and "Traceback" not in r.stderr


def test_api_key_is_enforced(monkeypatch):
    """In-process app with a stub model: the key check comes before any generation, in constant time."""
    import hmac

    from fastapi.testclient import TestClient

    from kolora.generation import GenConfig
    from kolora.serve import State, create_app

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    cfg = SimpleNamespace(model=SimpleNamespace(name="stub"), data=SimpleNamespace(system_prompt=None,
                                                                                   template="auto"))
    state = State("stub", None, None, cfg, GenConfig(), 16, 4096, api_key="s3cret")
    with TestClient(create_app(state), base_url="http://127.0.0.1") as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cr\xe9t".encode("latin-1")}).status_code == 401
        ok = http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "stub"
        assert http.get("/").status_code == 200  # the page itself asks for the key
    assert compared, "the key must be compared with hmac.compare_digest"


def test_page_loads_nothing_from_other_hosts(server):
    html = httpx.get(server.url + "/").text
    assert "<script" in html
    for marker in ('src="http', "src='http", 'href="http', "@import", "cdn"):
        assert marker not in html


# --------------------------------------------------------------------------- concurrency, queue, origin
def test_two_concurrent_requests_are_both_answered(client, server):
    questions = [QUESTION, "임대차 보증금은 언제 돌려받나요?"]
    alone = [ask(client, server, q).choices[0].message.content for q in questions]
    together = [None, None]

    def one(i):
        together[i] = ask(client, server, questions[i]).choices[0].message.content
    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


@pytest.fixture(scope="module")
def loaded(tiny_run):
    """The tiny run loaded in this process, for in-process servers (`live`)."""
    from kolora.generation import GenConfig
    from kolora.runs import open_run
    from kolora.serve import load_state

    return load_state(open_run(str(tiny_run)), GenConfig(max_new_tokens=DEFAULT_TOKENS), CAP)


@contextlib.contextmanager
def live(base, **settings):
    """create_app() for a copy of `base` (with `settings`) under uvicorn on a free loopback port, in a
    thread of this process, so tests can swap generation for a FakeGeneration."""
    import uvicorn

    from kolora.serve import create_app

    port = free_port()
    state = copy.copy(base)
    state.lock = threading.Lock()
    for key, value in {"host": "127.0.0.1", "port": port, **settings}.items():
        setattr(state, key, value)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the in-process server did not start"
        time.sleep(0.02)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, state=state)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class FakeGeneration:
    """Stands in for kolora.serve.generate_details: streams `steps` copies of a short piece, `delay`
    seconds apart, through the server's streamer as model.generate does. Records the prompt ids,
    and how each generation ended (finished, or the exception that cut it, with the step)."""

    def __init__(self, tokenizer, steps=400, delay=0.025, piece="답 "):
        self.steps, self.delay = steps, delay
        self.token = tokenizer.encode(piece, add_special_tokens=False)
        self.prompts, self.ended = [], []

    def __call__(self, model, tokenizer, prompts, gen, streamer=None):
        import torch

        from kolora.generation import Generation

        self.prompts.append(list(prompts[0]))
        step = 0
        try:
            streamer.put(torch.tensor([prompts[0]]))
            for step in range(1, min(self.steps, gen.max_new_tokens) + 1):
                time.sleep(self.delay)
                streamer.put(torch.tensor(self.token))
            streamer.end()
        except BaseException as e:
            self.ended.append((type(e).__name__, step))
            raise
        self.ended.append(("finished", step))
        return [Generation(tokenizer.decode(self.token * step).strip(), step * len(self.token), False)], {}

    def wait(self, n=1, timeout=8.0):
        deadline = time.time() + timeout
        while len(self.ended) < n and time.time() < deadline:
            time.sleep(0.02)
        return self.ended


def chat_body(**kwargs):
    return {"messages": [{"role": "user", "content": QUESTION}], **kwargs}


def test_non_streaming_client_that_disconnects_cancels_generation(loaded, monkeypatch):
    fake = FakeGeneration(loaded.tokenizer, steps=400, delay=0.025)  # 10 s unless cancelled
    monkeypatch.setattr("kolora.serve.generate_details", fake)
    with live(loaded) as srv:
        started = time.time()
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(srv.url + "/v1/chat/completions", json=chat_body(max_tokens=CAP), timeout=0.6)
        # the server notices within about a poll interval and sets the job's cancel event
        (how, step), = fake.wait(timeout=6)
        assert how == "Cancelled", fake.ended
        assert step < 100 and time.time() - started < 4, (step, time.time() - started)
        # the model is free again at once
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=10)
        assert r.status_code == 200 and fake.ended[-1] == ("finished", 2)


def test_queue_is_bounded_with_429(loaded, monkeypatch):
    fake = FakeGeneration(loaded.tokenizer, steps=400, delay=0.025)
    monkeypatch.setattr("kolora.serve.generate_details", fake)
    url = "/v1/chat/completions"
    with live(loaded, max_queue=1) as srv, httpx.Client(base_url=srv.url, timeout=10) as http:
        with http.stream("POST", url, json=chat_body(stream=True, max_tokens=CAP)) as running, \
                http.stream("POST", url, json=chat_body(stream=True, max_tokens=CAP)) as waiting:
            assert running.status_code == waiting.status_code == 200
            with http.stream("POST", url, json=chat_body(stream=True)) as third:
                assert third.status_code == 429
                assert int(third.headers["retry-after"]) >= 1
                body = json.loads(third.read())
            assert "--max-queue" in body["error"]["message"]
        # both clients left: their jobs end and free their places
        fake.wait(1)
        deadline = time.time() + 8
        while (r := http.post(url, json=chat_body(max_tokens=2))).status_code == 429 and time.time() < deadline:
            time.sleep(0.1)
        assert r.status_code == 200
    assert [how for how, _ in fake.ended[:1]] == ["Cancelled"]


def test_max_queue_flag():
    from kolora.cli import build_parser

    assert build_parser().parse_args(["serve", "runs/x"]).max_queue == 8
    args = build_parser().parse_args(["serve", "runs/x", "--max-queue", "2", "--allow-origin", "http://a.test:3000",
                                      "--allow-origin", "https://b.test,https://c.test"])
    assert args.max_queue == 2
    assert args.allow_origin == ["http://a.test:3000", "https://b.test,https://c.test"]
    r = run_cli("serve", "--help")
    for flag in ("--max-queue", "--allow-origin", "Host", "Origin", "429"):
        assert flag in r.stdout, flag


def test_foreign_host_origin_and_content_type_are_refused(loaded, monkeypatch):
    monkeypatch.setattr("kolora.serve.generate_details", FakeGeneration(loaded.tokenizer, steps=2, delay=0))
    with live(loaded) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        url, port = "/v1/chat/completions", srv.port
        # DNS rebinding: a foreign name pointing at 127.0.0.1 reads nothing
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1"):
            for method, path in (("GET", "/v1/models"), ("GET", "/"), ("POST", url)):
                r = http.request(method, path, json=chat_body(), headers={"Host": host})
                assert r.status_code == 403, (host, method, path, r.status_code)
        assert "Host" in r.json()["error"]["message"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
            assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
        # a web page elsewhere may not post to the API
        for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null"):
            r = http.post(url, json=chat_body(), headers={"Origin": origin})
            assert r.status_code == 403 and "Origin" in r.json()["error"]["message"], origin
            assert http.get("/v1/models", headers={"Origin": origin}).status_code == 403
        # the served page itself (same origin) keeps working
        r = http.post(url, json=chat_body(), headers={"Origin": f"http://127.0.0.1:{port}"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        r = http.post(url, json=chat_body(), headers={"Origin": f"http://localhost:{port}",
                                                      "Host": f"localhost:{port}"})
        assert r.status_code == 200
        # only JSON bodies: a form or text/plain post (no CORS preflight) is refused
        raw = json.dumps(chat_body()).encode()
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": ctype} if ctype else {}
            r = http.post(url, content=raw, headers=headers)
            assert r.status_code == 415, (ctype, r.status_code)
        assert "application/json" in r.json()["error"]["message"]
        r = http.post(url, content=raw, headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200


def test_allow_origin_lets_a_named_page_in(loaded, monkeypatch):
    monkeypatch.setattr("kolora.serve.generate_details", FakeGeneration(loaded.tokenizer, steps=2, delay=0))
    with live(loaded, allow_origins=("http://app.test:3000", "https://b.test")) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        url = "/v1/chat/completions"
        for origin in ("http://app.test:3000", "https://b.test"):
            r = http.post(url, json=chat_body(), headers={"Origin": origin})
            assert r.status_code == 200, (origin, r.text)
            assert r.headers.get("access-control-allow-origin") == origin
        pre = http.options(url, headers={"Origin": "http://app.test:3000", "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "content-type, authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.test:3000"
        assert http.post(url, json=chat_body(), headers={"Origin": "http://app.test:3001"}).status_code == 403
        assert http.post(url, json=chat_body(), headers={"Origin": "http://evil.example"}).status_code == 403


def test_allow_origin_flag_is_split_on_commas():
    from kolora.serve import parse_origins

    assert parse_origins(["http://a.test:3000", "https://B.test/, https://c.test"]) == \
        ("http://a.test:3000", "https://b.test", "https://c.test")
    with pytest.raises(Exception, match="allow-origin"):
        parse_origins(["a.test"])


# --------------------------------------------------------------------------- grounded answers
STATUTE = """# 주택임대차보호법

제3조(대항력 등) ① 임대차는 그 등기가 없는 경우에도 임차인이 주택의 인도와 주민등록을 마친 때에는 그 다음 날부터 제삼자에 대하여 효력이 생긴다.

제4조(임대차기간 등) ① 기간을 정하지 아니하거나 2년 미만으로 정한 임대차는 그 기간을 2년으로 본다. 다만, 임차인은 2년 미만으로 정한 기간이 유효함을 주장할 수 있다.
② 임대차기간이 끝난 경우에도 임차인이 보증금을 반환받을 때까지는 임대차관계가 존속되는 것으로 본다.

제8조(보증금 중 일정액의 보호) ① 임차인은 보증금 중 일정액을 다른 담보물권자보다 우선하여 변제받을 권리가 있다.
"""
GROUNDED_Q = "주택 임대차의 존속기간은 몇 년인가요?"
TERM = "주택임대차보호법 제4조(임대차기간 등)"  # what retrieval finds first for GROUNDED_Q
# cites 제4조 (which says 2년), an article the corpus lacks, and a number no cited article states
CITING = "주택임대차보호법 제4조 제1항에 따라 2년입니다. 제9조에 따르면 3년입니다."


@pytest.fixture(scope="module")
def grounded_run(tiny_models, small_csv, tmp_path_factory):
    """A run trained with retrieval.corpus on a three-article statute: it has <run>/index/."""
    root = tmp_path_factory.mktemp("grounded")
    statute = root / "주택임대차보호법.md"
    statute.write_text(STATUTE, encoding="utf-8")
    run = root / "tiny-grounded"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run),
                "--max-steps", "2", "--train.batch_size", "4", "--train.grad_accum", "1", "--train.eval_every", "2",
                "--train.save_every", "2", "--train.tensorboard", "false", "--train.health_check", "0",
                "--lora.r", "4", "--lora.alpha", "8", "--data.max_length", "512",
                "--retrieval.corpus", str(statute), "--retrieval.k", "2", "--retrieval.context_tokens", "64")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "index").is_dir()
    return run


@pytest.fixture(scope="module")
def grounded(grounded_run):
    from kolora.generation import GenConfig
    from kolora.runs import open_run
    from kolora.serve import load_state

    state = load_state(open_run(str(grounded_run)), GenConfig(max_new_tokens=DEFAULT_TOKENS), CAP)
    assert state.grounding is not None
    return state


def post(srv, question=GROUNDED_Q, **kwargs):
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": question}],
                                                           **kwargs}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def decoded(state, prompt) -> str:
    return state.tokenizer.decode(prompt, skip_special_tokens=True)


def test_grounded_reply_names_its_sources_and_what_it_cites(grounded, monkeypatch):
    """The passages go into the prompt exactly as `kolora chat` puts them there; the reply lists
    them, marks the one the answer cites, and names what the citation check could not find."""
    from kolora.data import Example
    from kolora.prompt import CONTEXT_MARK, encode_prompt

    fake = FakeGeneration(grounded.tokenizer, steps=1, delay=0, piece=CITING)
    monkeypatch.setattr("kolora.serve.generate_details", fake)
    with live(grounded) as srv:
        body = post(srv)
    assert body["choices"][0]["message"]["content"] == CITING
    sources = body["sources"]
    assert [s["header"] for s in sources][0] == TERM and len(sources) == 2  # retrieval.k 2
    assert all(set(s) == {"id", "header", "score", "text", "cited"} for s in sources)
    top = sources[0]
    assert top["id"] == "주택임대차보호법 제4조" and top["cited"] is True and top["score"] > 0
    assert top["text"].startswith("① 기간을 정하지 아니하거나 2년 미만으로") and "② 임대차기간이 끝난" in top["text"]
    assert [s["cited"] for s in sources[1:]] == [False]
    assert any("제9조" in claim and "no such article" in claim for claim in body["unsupported"])
    assert any("3년" in claim for claim in body["unsupported"])
    assert not any("2년" in claim for claim in body["unsupported"])  # 제4조 says 2년

    [prompt] = fake.prompts
    text = decoded(grounded, prompt)
    assert CONTEXT_MARK in text and f"[{TERM}]" in text and "기간을 정하지" in text
    assert text.index(TERM) < text.index(GROUNDED_Q)  # the passages come before the question
    # exactly chat's prompt: the same retrieval, context budget and template
    [ex], _ = grounded.grounding.ground([Example(GROUNDED_Q, "")], grounded.tokenizer)
    cfg = grounded.cfg.data
    assert prompt == encode_prompt(grounded.tokenizer, ex, cfg.system_prompt, cfg.template)
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_grounded_retrieval_uses_the_last_user_message(grounded, monkeypatch):
    fake = FakeGeneration(grounded.tokenizer, steps=2, delay=0)
    monkeypatch.setattr("kolora.serve.generate_details", fake)
    messages = [{"role": "user", "content": "보증금 중 일정액은 우선 변제받나요?"},
                {"role": "assistant", "content": "네."},
                {"role": "user", "content": GROUNDED_Q}]
    with live(grounded) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["sources"][0]["header"] == TERM
    assert "보증금 중 일정액의 보호" not in decoded(grounded, fake.prompts[0])


def test_no_retrieval_answers_ungrounded(grounded, monkeypatch):
    """--no-retrieval: no passages in the prompt, no `sources` in the reply (an ungrounded run's reply)."""
    from kolora.data import Example
    from kolora.prompt import CONTEXT_MARK, encode_prompt

    fake = FakeGeneration(grounded.tokenizer, steps=2, delay=0)
    monkeypatch.setattr("kolora.serve.generate_details", fake)
    with live(grounded, grounding=None) as srv:
        body = post(srv)
        models = httpx.get(srv.url + "/v1/models", timeout=10).json()
    assert body["choices"][0]["message"]["content"]
    assert "sources" not in body and "unsupported" not in body
    assert models["data"][0]["grounded"] is False
    [prompt] = fake.prompts
    assert CONTEXT_MARK not in decoded(grounded, prompt) and "기간을 정하지" not in decoded(grounded, prompt)
    cfg = grounded.cfg.data
    assert prompt == encode_prompt(grounded.tokenizer, Example(GROUNDED_Q, ""), cfg.system_prompt, cfg.template)


def test_no_retrieval_flag_reaches_the_state(grounded_run, monkeypatch):
    """`kolora serve RUN --no-retrieval` loads no index; without the flag a grounded run loads its own."""
    from kolora import serve as serve_module
    from kolora.cli import build_parser

    started = []
    monkeypatch.setattr(serve_module, "serve", lambda state, host, port: started.append(state))
    for flags, grounded_ in (([], True), (["--no-retrieval"], False)):
        args = build_parser().parse_args(["serve", str(grounded_run), "--port", str(free_port()), *flags])
        assert serve_module.run(args) == 0
        assert (started[-1].grounding is not None) is grounded_, flags
    assert "--no-retrieval" in run_cli("serve", "--help").stdout


def test_a_question_retrieval_cannot_place_is_still_answered(grounded, monkeypatch):
    from kolora.grounding import NO_SOURCES

    fake = FakeGeneration(grounded.tokenizer, steps=2, delay=0)
    monkeypatch.setattr("kolora.serve.generate_details", fake)
    assert grounded.grounding.retrieve("hello there?") == []
    with live(grounded) as srv:
        body = post(srv, "hello there?")
        streamed = sse_events(srv, "hello there?")
    assert body["choices"][0]["message"]["content"]
    assert body["sources"] == [] and body["unsupported"] == []
    assert NO_SOURCES in decoded(grounded, fake.prompts[0])  # the prompt says so, as in training
    assert streamed[0]["sources"] == [] and streamed[-1]["sources"] == []


def sse_events(srv, question=GROUNDED_Q, **kwargs) -> list[dict]:
    """The JSON events of a streamed reply, checking that it ends with [DONE]."""
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": question}], "stream": True, **kwargs}) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_streaming_sends_sources_first_and_checked_last(grounded, monkeypatch):
    """First chunk: the sources (nothing cited yet). The finish_reason chunk: the sources with `cited`,
    and `unsupported`. The usage chunk (include_usage) stays OpenAI's."""
    fake = FakeGeneration(grounded.tokenizer, steps=1, delay=0, piece=CITING)
    monkeypatch.setattr("kolora.serve.generate_details", fake)
    with live(grounded) as srv:
        events = sse_events(srv, stream_options={"include_usage": True})
    first, *middle, finish, usage = events
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert [s["header"] for s in first["sources"]][0] == TERM
    assert not any(s["cited"] for s in first["sources"]) and "unsupported" not in first
    assert all("sources" not in e for e in middle)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in middle) == CITING
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert [s["cited"] for s in finish["sources"]] == [True, False]
    assert [s["text"] for s in finish["sources"]] == [s["text"] for s in first["sources"]]
    assert any("제9조" in claim for claim in finish["unsupported"])
    assert usage["choices"] == [] and "usage" in usage and "sources" not in usage


def test_grounded_answers_like_kolora_chat_through_the_openai_client(grounded):
    """The real tiny model, no fakes: the openai client reads the reply unchanged (the extra fields
    ride along in model_extra), and the answer is `kolora chat`'s grounded answer."""
    from kolora.data import Example
    from kolora.generation import GenConfig, generate_batched

    with live(grounded) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=grounded.name,
                                               messages=[{"role": "user", "content": GROUNDED_Q}])
        chunks = list(client.chat.completions.create(model=grounded.name, stream=True,
                                                     messages=[{"role": "user", "content": GROUNDED_Q}]))
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert reply.model_extra["sources"][0]["header"] == TERM
    assert isinstance(reply.model_extra["unsupported"], list)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == reply.choices[0].message.content
    assert chunks[0].model_extra["sources"][0]["header"] == TERM

    examples, _ = grounded.grounding.ground([Example(GROUNDED_Q, "")], grounded.tokenizer)
    rows, _ = generate_batched(grounded.model, grounded.tokenizer, grounded.cfg, examples,
                               GenConfig(max_new_tokens=DEFAULT_TOKENS))
    assert reply.choices[0].message.content == rows[0].text


def test_ungrounded_run_sends_no_sources(loaded, monkeypatch):
    monkeypatch.setattr("kolora.serve.generate_details", FakeGeneration(loaded.tokenizer, steps=2, delay=0))
    assert loaded.grounding is None
    with live(loaded) as srv:
        body = post(srv, QUESTION)
        events = sse_events(srv, QUESTION)
    assert "sources" not in body and "unsupported" not in body
    assert not any("sources" in e or "unsupported" in e for e in events)


# --------------------------------------------------------------------------- stop strings
def cut(stops, pieces):
    from kolora.serve import StopCutter

    cutter = StopCutter(stops)
    out = [cutter.feed(p) for p in pieces]
    return "".join(out) + cutter.flush(), cutter.hit


@pytest.mark.parametrize("stops, pieces, expected, hit", [
    (["END"], ["abcE", "N", "Dxyz"], "abc", True),
    (["END"], ["ab", "cE", "Nd"], "abcENd", False),          # a prefix held back, then released
    (["END"], ["  ab", "E", "NEND"], "abEN", True),           # an earlier partial match that fails
    (["aab"], ["a", "a", "a", "b", "c"], "a", True),          # overlapping prefixes
    (["b", "a"], ["xab"], "x", True),                       # the earliest stop wins, whatever the order
    (["###", "\n\n"], ["답입니다.\n", "\n### 질문"], "답입니다.", True),
    (["전세", "권"], ["민법의 전", "세권"], "민법의 ", True),
    ([], ["  a", "b  "], "ab  ", False),
])
def test_stop_cutter_cuts_stops_split_across_pieces(stops, pieces, expected, hit):
    assert cut(stops, pieces) == (expected, hit)
    assert cut(stops, list("".join(pieces))) == (expected, hit)  # one character at a time


def test_stop_cutter_is_linear_in_the_stop_length():
    """Held-back text that keeps matching a long stop must not be re-checked from scratch each piece."""
    from kolora.serve import StopCutter

    stop = "가" * 2500 + "끝"
    cutter = StopCutter([stop, "x" * 1000])
    t0 = time.perf_counter()
    out = [cutter.feed("가") for _ in range(2000)]
    assert time.perf_counter() - t0 < 1.0
    assert "".join(out) == "" and cutter.flush() == "가" * 2000


# --------------------------------------------------------------------------- the web page
def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def install_chromium() -> str | None:
    """Debian's chromium, installed the first time the page test runs, where apt can be used."""
    if find_chromium() or os.environ.get("KOLORA_NO_APT"):
        return find_chromium()
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, env=env, timeout=900)
    return find_chromium()


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe):
    JSON messages ending in NUL, written to the browser's fd 3 and read from its fd 4. No
    websocket client and no browser download needed."""

    def __init__(self, exe: str, profile: str):
        to_browser, self._to_w = os.pipe()
        self._from_r, from_browser = os.pipe()

        def wire():  # dup first: os.pipe() may have returned 3 or 4, and dup2(fd, fd) keeps close-on-exec
            r, w = os.dup(to_browser), os.dup(from_browser)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=wire)
        os.close(to_browser)
        os.close(from_browser)
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue] = {}
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def _read(self) -> None:
        buffer = b""
        while data := os.read(self._from_r, 1 << 16):
            buffer += data
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                msg = json.loads(raw)
                if msg.get("id") in self._waiting:
                    self._waiting[msg["id"]].put(msg)
        for q in list(self._waiting.values()):
            q.put({"error": "browser closed"})

    def send(self, method: str, params: dict | None = None, page: bool = False, timeout: float = 30):
        mid = next(self._ids)
        self._waiting[mid] = q = queue.Queue()
        msg = {"id": mid, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        reply = q.get(timeout=timeout)
        del self._waiting[mid]
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, page=True)
        return result["result"].get("value")

    def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key,
                                                 "windowsVirtualKeyCode": code}, page=True)

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - a browser that will not close is killed
            self.proc.kill()


@pytest.fixture(scope="module")
def browser():
    exe = install_chromium()
    if exe is None:
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get; "
                    "Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        b = Chromium(exe, profile)
        yield b
        b.close()


ASSISTANT = "document.querySelectorAll('.msg.assistant')"


@pytest.mark.slow
def test_web_page_streams_an_answer_and_names_the_run(browser, client, server):
    expected = ask(client, server).choices[0].message.content
    browser.send("Page.navigate", {"url": server.url + "/"}, page=True)
    assert browser.wait_for("document.getElementById('run-name').textContent !== '…' "
                            "&& document.getElementById('run-name').textContent") == server.name
    assert browser.js("document.getElementById('base-model').textContent") != "…"

    browser.js("document.getElementById('question').focus()")
    browser.send("Input.insertText", {"text": QUESTION}, page=True)  # typed, Korean included
    browser.key("Enter", 13)
    seen = set()
    deadline = time.time() + 120
    while time.time() < deadline:
        state = browser.js(f"(() => {{ const d = {ASSISTANT}[0]; return d ? [d.dataset.state, "
                           f"d.querySelector('.text').textContent] : null }})()")
        if state:
            seen.add(state[1])
            if state[0] != "streaming":
                break
        time.sleep(0.02)
    assert state and state[0] == "done", state
    assert state[1] == expected
    assert browser.js("document.querySelector('.msg.user .text').textContent") == QUESTION
    assert len(seen) > 1 or browser.js(f"{ASSISTANT}[0].dataset.pieces > 1"), "the page did not stream"

    # a second question carries the first turn as history
    browser.send("Input.insertText", {"text": "더 자세히 설명해 주세요."}, page=True)
    browser.key("Enter", 13)
    browser.wait_for(f"{ASSISTANT}.length === 2 && {ASSISTANT}[1].dataset.state === 'done'", timeout=120)
    assert browser.js("document.querySelectorAll('.msg.error').length") == 0


# The page's script run in Node with a minimal DOM (no browser needed): element trees built with
# createElement / append / textContent, every innerHTML write recorded.
PAGE_HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const script = html.slice(html.indexOf("<script>") + 8, html.lastIndexOf("</script>"));
const innerHTML = [];
class El {
  constructor(tag) { this.tagName = tag.toUpperCase(); this.children = []; this.own = ""; this.className = "";
                     this.dataset = {}; this.title = ""; this.parent = null; this.scrollTop = 0; this.scrollHeight = 0; }
  append(...items) { for (const x of items) { const c = typeof x === "string" ? Object.assign(new El("#text"), {own: x}) : x;
                                              c.parent = this; this.children.push(c); } }
  replaceChildren(...items) { this.children = []; this.own = ""; this.append(...items); }
  remove() { if (this.parent) this.parent.children = this.parent.children.filter((c) => c !== this); }
  get textContent() { return this.own + this.children.map((c) => c.textContent).join(""); }
  set textContent(v) { this.children = []; this.own = String(v); }
  set innerHTML(v) { innerHTML.push(String(v)); this.children = []; this.own = ""; }
  addEventListener() {} focus() {} requestSubmit() {}
  all(pred, out = []) { for (const c of this.children) { if (pred(c)) out.push(c); c.all(pred, out); } return out; }
  querySelectorAll(sel) { const [tag, ...cls] = sel.split(".");
    return this.all((e) => (!tag || e.tagName === tag.toUpperCase()) && cls.every((k) => e.className.split(" ").includes(k))); }
  querySelector(sel) { return this.querySelectorAll(sel)[0] || null; }
}
const ids = {};
const document = { body: new El("body"), title: "", createElement: (t) => new El(t),
                   getElementById: (id) => ids[id] || (ids[id] = Object.assign(new El("div"), {id})) };
const context = vm.createContext({ document, console, TextDecoder, TextEncoder, AbortController, JSON, Promise,
  sessionStorage: { getItem: () => null, setItem() {} }, fetch: () => new Promise(() => {}), prompt: () => null });
vm.runInContext(script, context);
const view = (div) => div.querySelectorAll("details").map((d) => ({
  cls: d.className, id: d.dataset.id, summary: d.querySelector("summary").textContent,
  body: d.querySelector("div.source-text").textContent, bold: d.className.split(" ").includes("cited") }));
const warn = (div) => div.querySelectorAll("li").map((li) => li.textContent);
const events = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));
(async () => {
  const div = vm.runInContext("bubble('assistant', '', 'm')", context);
  const sse = events.map((e) => "data: " + (typeof e === "string" ? e : JSON.stringify(e)) + "\n\n").join("");
  const bytes = new TextEncoder().encode(sse);
  let sent = false;
  const res = { body: { getReader: () => ({ read: async () => {
    if (sent) return { done: true }; sent = true; return { value: bytes, done: false }; } }) } };
  const seen = [];
  context.res = res; context.div = div; context.record = (s, u) => { seen.push({ details: view(div), warn: warn(div) }); };
  let text = "";
  context.onText = (t) => { text += t; };
  const finish = await vm.runInContext(
    "streamAnswer(res, onText, (s, u) => { showSources(div, s, u); record(); })", context);
  console.log(JSON.stringify({ finish, text, seen, innerHTML, boxes: div.querySelectorAll("div.sources").length,
    title: (div.querySelector("div.sources-title") || {}).textContent || null }));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def run_page(events, tmp_path) -> dict:
    from kolora.serve import PAGE

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    (tmp_path / "harness.js").write_text(PAGE_HARNESS, encoding="utf-8")
    (tmp_path / "events.json").write_text(json.dumps(events, ensure_ascii=False), encoding="utf-8")
    r = subprocess.run([node, str(tmp_path / "harness.js"), str(PAGE), str(tmp_path / "events.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_page_shows_sources_as_details_and_escapes_them(tmp_path):
    """The page's own stream parser and source view: the first chunk's sources at once, replaced by
    the final chunk's (cited ✔ and bold, unsupported claims in the warning list); corpus and model
    text go in as text, never as HTML."""
    evil = '<img src=x onerror="alert(1)">'
    src = [{"id": "주택임대차보호법 제4조", "header": TERM, "score": 1.27, "text": "① 기간을 …\n② " + evil, "cited": False},
           {"id": "주택임대차보호법 제3조", "header": "주택임대차보호법 제3조(대항력 등)" + evil, "score": 0.15,
            "text": "① 임대차는 …", "cited": False}]
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "제4조에 따라 "},
                                                             "finish_reason": None}]}
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
               "sources": src},
              chunk, {**chunk, "choices": [{"index": 0, "delta": {"content": evil}, "finish_reason": None}]},
              {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
               "sources": [{**src[0], "cited": True}, src[1]], "unsupported": ["citation 주택임대차보호법 제9조: " + evil]},
              {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 1}}, "[DONE]"]
    out = run_page(events, tmp_path)
    assert out["finish"] == "stop" and out["text"] == "제4조에 따라 " + evil
    first, last = out["seen"]
    assert [d["summary"] for d in first["details"]] == [TERM, src[1]["header"]] and not first["warn"]
    assert not any(d["bold"] for d in first["details"])
    assert last["details"][0] == {"cls": "source cited", "id": src[0]["id"], "summary": "✔ " + TERM,
                                  "body": src[0]["text"], "bold": True}
    assert last["details"][1]["summary"] == src[1]["header"] and not last["details"][1]["bold"]
    assert len(last["warn"]) == 1 and last["warn"][0].endswith("제9조: " + evil) and "⚠" in last["warn"][0]
    assert out["innerHTML"] == [], "text must never go through innerHTML"
    assert "근거" in out["title"]
    from kolora.serve import PAGE

    html = PAGE.read_text(encoding="utf-8")
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "outerHTML" not in html
    assert ".source.cited summary { font-weight: 700" in html and ".unsupported" in html


def test_page_says_when_nothing_was_found_and_shows_nothing_ungrounded(tmp_path):
    base = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "답"},
                                                            "finish_reason": None}]}
    out = run_page([{**base, "sources": []}, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                              "sources": [], "unsupported": []}, "[DONE]"], tmp_path)
    assert out["seen"][-1] == {"details": [], "warn": []}
    assert "검색된 조문 없음" in out["title"]
    assert out["boxes"] == 1
    out = run_page([base, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]"], tmp_path)
    assert out["text"] == "답" and out["seen"] == [] and out["boxes"] == 0  # ungrounded: no sources box at all
