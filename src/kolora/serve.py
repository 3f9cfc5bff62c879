"""`kolora serve RUN`: an OpenAI-compatible API and a web chat page for one trained run.

    GET  /                      chat page (streams answers, shows which run answers)
    GET  /v1/models             the run, as the only model
    POST /v1/chat/completions   OpenAI chat completions, `stream: true` as server-sent events

Prompts go through `kolora.prompt.encode_prompt` and generation through `kolora.chat`, so the
server answers exactly like `kolora chat` (greedy by default). One model, one generation at a
time (a lock: on a CPU, parallel generations only slow each other down). Safe by default: binds
127.0.0.1, request bodies and max_tokens are bounded, optional bearer key (--api-key or
KOLORA_API_KEY). Bad requests get a 4xx with an OpenAI-style error body.
"""


import functools
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KoloraError
from .generation import add_gen_flags, gen_config, generate_details, load_tuned
from .runs import open_run

HELP = "serve a run: OpenAI-compatible /v1/chat/completions and a web chat page"

MAX_BODY_BYTES = 64 * 1024
MAX_TOKENS_CAP = 1024
PAGE = Path(__file__).resolve().parent / "web" / "chat.html"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory written by `kolora train`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens-cap", type=int, default=MAX_TOKENS_CAP,
                   help="upper bound for a request's max_tokens (larger requests are cut to it)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest accepted request body")
    p.add_argument("--api-key", default=os.environ.get("KOLORA_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $KOLORA_API_KEY; none = no key)")
    add_gen_flags(p)  # defaults for requests that don't set them (max_tokens, temperature, top_p)


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise KoloraError(f"--port {args.port} is not a TCP port", "use 1-65535")
    if args.max_tokens_cap < 1 or args.max_body_bytes < 1024:
        raise KoloraError("--max-tokens-cap must be ≥ 1 and --max-body-bytes ≥ 1024", "raise them")
    check_port_free(args.host, args.port)
    run_dir = open_run(args.run)
    state = load_state(run_dir, gen_config(args), args.max_tokens_cap, args.max_body_bytes, args.api_key)
    serve(state, args.host, args.port)
    return 0


# --------------------------------------------------------------------------- state
@dataclass
class State:
    name: str  # the model id clients send
    model: object
    tokenizer: object
    cfg: object
    defaults: object  # generation.GenConfig for fields a request leaves out
    max_tokens_cap: int
    max_body_bytes: int
    api_key: str | None = None
    context: int | None = None  # positions the model can attend to
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = field(default_factory=lambda: int(time.time()))


def load_state(run_dir, defaults, max_tokens_cap=MAX_TOKENS_CAP, max_body_bytes=MAX_BODY_BYTES, api_key=None) -> State:
    print(f"[kolora] loading {run_dir.path} …", file=sys.stderr, flush=True)
    model, tokenizer, cfg = load_tuned(run_dir)
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return State(run_dir.path.resolve().name, model, tokenizer, cfg, defaults, max_tokens_cap, max_body_bytes,
                 api_key or None, context)


def check_port_free(host: str, port: int) -> None:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise KoloraError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                          "pass another --port, or stop the program that uses it") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- requests
def parse_request(raw: bytes, state: State):
    """Body bytes → (Example, GenConfig, stop strings, stream, include_usage), or ApiError."""
    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        req = request_model().model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"])
        raise ApiError(422, f"{param}: {err['msg']}", param=param) from None
    if req.model not in (None, "", state.name):
        raise ApiError(404, f"model '{req.model}' is not served here; this server answers with '{state.name}'",
                       param="model", code="model_not_found")
    if req.n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    ex = to_example(req.messages)
    gen = request_gen(req, state)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    include_usage = bool(req.stream_options and req.stream_options.get("include_usage"))
    return ex, gen, [s for s in stop if s], bool(req.stream), include_usage


def text_of(content, index: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{index}].content: only text parts are supported",
                           param=f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)


def to_example(messages):
    """OpenAI messages → kolora's Example (system prompt, earlier turns, the question)."""
    from .data import Example

    if not messages:
        raise ApiError(400, "messages must contain at least one message", param="messages")
    systems, turns = [], []
    for i, m in enumerate(messages):
        text = text_of(m.content, i)
        if m.role in ("system", "developer"):
            systems.append(text)
        else:
            turns.append({"role": m.role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages")
    if not turns[-1]["content"].strip():
        raise ApiError(400, "the last user message is empty", param="messages")
    return Example(turns[-1]["content"], "", history=turns[:-1], system="\n\n".join(systems) or None)


def request_gen(req, state: State):
    """The request's generation settings; what it leaves out comes from the server's defaults."""
    wanted = req.max_completion_tokens or req.max_tokens or state.defaults.max_new_tokens
    return gen_config({"max_new_tokens": min(wanted, state.max_tokens_cap), "temperature": req.temperature,
                       "top_p": req.top_p, "repetition_penalty": req.repetition_penalty, "seed": req.seed},
                      state.defaults)


@functools.cache
def request_model():
    """The pydantic request model, built on first use so `kolora --help` never imports pydantic."""
    from typing import Literal, Union

    from pydantic import BaseModel, ConfigDict, Field

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[str, list[dict]]

    class Request(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI fields we don't use (user, logit_bias, …)
        model: str | None = None
        messages: list[Message] = Field(min_length=1, max_length=256)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        repetition_penalty: float | None = Field(None, gt=0, le=10)  # not OpenAI; vLLM and others accept it
        seed: int | None = None
        n: int | None = None
        stop: Union[str, list[str], None] = Field(None)
        stream: bool | None = False
        stream_options: dict | None = None

    return Request


# --------------------------------------------------------------------------- generation
class Cancelled(Exception):
    """Raised inside generate() by the streamer when the client went away or a stop string appeared."""


def _streamer(tokenizer, cancel: threading.Event):
    from transformers import TextIteratorStreamer

    class Streamer(TextIteratorStreamer):
        generated = 0  # tokens after the prompt, for usage when generation is cut short

        def put(self, value):
            if cancel.is_set():
                raise Cancelled()
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.generated += value.numel()
            super().put(value)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class Job:
    """One generation in a worker thread; `pieces()` yields text as it is produced, with stop
    strings cut out. Afterwards: finish_reason, completion_tokens."""

    def __init__(self, state: State, prompt: list[int], gen, stop: list[str]):
        self.state, self.prompt, self.gen, self.stop = state, prompt, gen, stop
        self.cancel = threading.Event()
        self.streamer = _streamer(state.tokenizer, self.cancel)
        self.result = None
        self.error: BaseException | None = None
        self.hit_stop = False
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            with self.state.lock:
                if not self.cancel.is_set():
                    rows, _ = generate_details(self.state.model, self.state.tokenizer, [self.prompt], self.gen,
                                               streamer=self.streamer)
                    self.result = rows[0]
        except Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - reported to the client, not lost in a thread
            self.error = e
        finally:
            self.streamer.text_queue.put(None)

    def next_piece(self, timeout: float = 0.25):
        """Next raw piece of text, '' when none is ready yet, None at the end."""
        try:
            return self.streamer.text_queue.get(timeout=timeout)
        except queue.Empty:
            return ""

    def pieces(self):
        """Sync iterator over the answer text (for non-streaming requests)."""
        cutter = StopCutter(self.stop)
        while True:
            raw = self.next_piece(timeout=None)
            if raw is None:
                break
            out = cutter.feed(raw)
            if out:
                yield out
            if cutter.hit:
                self.hit_stop = True
                self.cancel.set()
        self.thread.join()
        tail = cutter.flush()
        if tail:
            yield tail

    @property
    def finish_reason(self) -> str:
        return "stop" if self.hit_stop or (self.result is not None and self.result.stopped) else "length"

    @property
    def completion_tokens(self) -> int:
        return self.result.new_tokens if self.result is not None else self.streamer.generated


class StopCutter:
    """Streams text but holds back what could be the start of a stop string, and ends at one."""

    def __init__(self, stops: list[str]):
        self.stops, self.buffer, self.hit, self.started = stops, "", False, False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        self.buffer += text
        if not self.started:  # answers are shown without leading whitespace, as `kolora chat` does
            self.buffer = self.buffer.lstrip()
            self.started = bool(self.buffer)
        for s in self.stops:
            at = self.buffer.find(s)
            if at >= 0:
                self.hit = True
                out, self.buffer = self.buffer[:at], ""
                return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[:len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.hit else self.buffer), ""
        return out.rstrip()


# --------------------------------------------------------------------------- app
def create_app(state: State):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .prompt import encode_prompt

    app = FastAPI(title="kolora", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind=kind).body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer …)", code="invalid_api_key",
                           kind="authentication_error")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > state.max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {state.max_body_bytes} "
                                "(kolora serve --max-body-bytes)", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():  # also bounds bodies sent without a Content-Length
            body += chunk
            if len(body) > state.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {state.max_body_bytes} bytes",
                               code="request_too_large")
        return bytes(body)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id != state.name:
            raise ApiError(404, f"model '{model_id}' is not served here", param="model", code="model_not_found")
        return model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        ex, gen, stop, stream, include_usage = parse_request(await read_body(request), state)
        prompt = encode_prompt(state.tokenizer, ex, state.cfg.data.system_prompt, state.cfg.data.template)
        if state.context and len(prompt) + gen.max_new_tokens > state.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; with max_tokens {gen.max_new_tokens} it "
                                f"exceeds the model's context of {state.context}", param="messages",
                           code="context_length_exceeded")
        reply = Reply(state.name, len(prompt))
        job = Job(state, prompt, gen, stop)
        if stream:
            return StreamingResponse(sse(job, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = await run_in_threadpool(lambda: "".join(job.pieces()).strip())
        if job.error is not None:
            raise ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}", kind="server_error")
        return reply.completion(text, job.finish_reason, job.completion_tokens)

    return app


def model_card(state: State) -> dict:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "kolora",
            "base_model": state.cfg.model.name, "max_tokens_cap": state.max_tokens_cap}


@dataclass
class Reply:
    model: str
    prompt_tokens: int
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def completion(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason, "logprobs": None}],
                "usage": self.usage(completion_tokens)}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def sse(job: Job, reply: Reply, include_usage: bool):
    """Server-sent events in OpenAI's chunk format. A client that disconnects cancels the generation
    (the streamer raises inside generate), so the lock is freed for the next request."""
    from starlette.concurrency import run_in_threadpool

    cutter = StopCutter(job.stop)
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            raw = await run_in_threadpool(job.next_piece)
            if raw is None:
                break
            text = cutter.feed(raw)
            if text:
                yield reply.chunk({"content": text})
            if cutter.hit:
                job.hit_stop = True
                job.cancel.set()
        await run_in_threadpool(job.thread.join)
        tail = cutter.flush()
        if tail:
            yield reply.chunk({"content": tail})
        if job.error is not None:
            err = ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}", kind="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        yield reply.chunk({}, job.finish_reason)
        if include_usage:
            usage = {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
                     "model": reply.model, "choices": [], "usage": reply.usage(job.completion_tokens)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()


def serve(state: State, host: str, port: int) -> None:
    import uvicorn

    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"kolora serve: {state.name} (base {state.cfg.model.name}) — chat page {url}/ , "
          f"OpenAI base_url {url}/v1", file=sys.stderr, flush=True)
    if not is_loopback(host):
        print(f"WARNING: listening on {host}: other machines can reach this server"
              + ("" if state.api_key else " and no --api-key is set"), file=sys.stderr, flush=True)
    uvicorn.run(create_app(state), host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
