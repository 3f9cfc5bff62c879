"""`kolora serve RUN`: an OpenAI-compatible API and a web chat page for one trained run.

    GET  /                      chat page (streams answers, shows which run answers)
    GET  /v1/models             the run, as the only model
    POST /v1/chat/completions   OpenAI chat completions, `stream: true` as server-sent events

Prompts go through `kolora.prompt.encode_prompt` and generation through `kolora.generation`, so the
server answers exactly like `kolora chat` (greedy by default). One model, one generation at a
time (a lock: on a CPU, parallel generations only slow each other down); at most --max-queue
requests wait for it, more get 429 with Retry-After, and a client that disconnects (streaming or
not) cancels its generation. Safe by default: binds 127.0.0.1; request bodies, max_tokens and stop
strings are bounded; requests must name this server in `Host` (no DNS rebinding) and come from its
own page or an --allow-origin (`Origin`); POST bodies must be application/json (no form or
text/plain posts from other sites); optional bearer key (--api-key or KOLORA_API_KEY), compared in
constant time. Bad requests get a 4xx with an OpenAI-style error body.

Grounded answers: a run trained with `retrieval.corpus` answers from its saved index (`<run>/index/`,
loaded once at start; --no-retrieval answers without it). The last user message is the question:
its passages go into the prompt as in `kolora chat`, and the reply names them beside OpenAI's fields
(clients that don't know them, like the openai package, ignore them):

    "sources": [{"id", "header", "score", "text", "cited"}, …]   retrieved passages, best first; [] when
                                                                 retrieval found nothing; `cited`: the
                                                                 answer cites that article
    "unsupported": ["citation 민법 제999조: no such article", …]  what the citation check could not find

Non-streaming: both at the top level of the chat.completion object. Streaming: `sources` in the
first chunk (every `cited` false: nothing is written yet), then `sources` (with `cited`) and
`unsupported` again in the chunk that carries `finish_reason` (the last chunk before `[DONE]`, or
before the usage chunk with stream_options.include_usage). An ungrounded run (or --no-retrieval)
sends neither field.
"""


import functools
import hmac
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
from urllib.parse import urlsplit

from . import grounding
from .errors import KoloraError
from .generation import add_gen_flags, gen_config, generate_details, load_tuned
from .runs import open_run

HELP = "serve a run: OpenAI-compatible /v1/chat/completions and a web chat page"

MAX_BODY_BYTES = 64 * 1024
MAX_TOKENS_CAP = 1024
MAX_QUEUE = 8  # requests that may wait for the model while one generates
MAX_STOPS, MAX_STOP_CHARS = 4, 64  # OpenAI allows 4 stop strings
RETRY_AFTER_S = 2
POLL_S = 0.25  # how often a waiting request checks whether its client is still there
PAGE = Path(__file__).resolve().parent / "web" / "chat.html"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory written by `kolora train`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network, "
                        "and then requests may name any of its IP addresses or its host name in Host)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens-cap", type=int, default=MAX_TOKENS_CAP,
                   help="upper bound for a request's max_tokens (larger requests are cut to it)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest accepted request body")
    p.add_argument("--api-key", default=os.environ.get("KOLORA_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $KOLORA_API_KEY; none = no key)")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help=f"requests that may wait while one generates (default {MAX_QUEUE}); more get HTTP 429 "
                        "with Retry-After. 0: one request at a time")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept requests from web pages at ORIGIN (e.g. http://localhost:3000; repeatable or "
                        "comma-separated; * = any), with CORS headers for them. By default only this server's own "
                        "chat page may call the API (other `Origin`s get 403), and only requests whose `Host` is "
                        "the bound address, localhost, 127.0.0.1 or [::1] with --port are answered")
    p.add_argument("--no-retrieval", action="store_true",
                   help="a grounded run (trained with retrieval.corpus) answers without retrieved passages, and "
                        "replies carry no `sources`")
    add_gen_flags(p)  # defaults for requests that don't set them (max_tokens, temperature, top_p)


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise KoloraError(f"--port {args.port} is not a TCP port", "use 1-65535")
    if args.max_tokens_cap < 1 or args.max_body_bytes < 1024:
        raise KoloraError("--max-tokens-cap must be ≥ 1 and --max-body-bytes ≥ 1024", "raise them")
    if args.max_queue < 0:
        raise KoloraError(f"--max-queue {args.max_queue} is negative", "pass 0 or more")
    origins = parse_origins(args.allow_origin)
    check_port_free(args.host, args.port)
    run_dir = open_run(args.run)
    state = load_state(run_dir, gen_config(args), args.max_tokens_cap, args.max_body_bytes, args.api_key,
                       host=args.host, port=args.port, allow_origins=origins, max_queue=args.max_queue,
                       retrieval=not args.no_retrieval)
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
    host: str = "127.0.0.1"  # the bound address: requests must name it (or a loopback name) in Host
    port: int | None = None  # the bound port (None: any, for in-process use)
    allow_origins: tuple = ()  # normalized origins (parse_origins) whose pages may call the API
    max_queue: int = MAX_QUEUE
    grounding: object = None  # grounding.Grounding of a run trained with retrieval.corpus; None: ungrounded
    ground_lock: threading.Lock = field(default_factory=threading.Lock)  # one retrieval or check at a time


def load_state(run_dir, defaults, max_tokens_cap=MAX_TOKENS_CAP, max_body_bytes=MAX_BODY_BYTES, api_key=None,
               retrieval: bool = True, **settings) -> State:
    """`settings`: State's host, port, allow_origins, max_queue. `retrieval`: load the run's index
    (a grounded run); False answers ungrounded."""
    print(f"[kolora] loading {run_dir.path} …", file=sys.stderr, flush=True)
    model, tokenizer, cfg = load_tuned(run_dir)
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    g = grounding.load(run_dir.path, cfg) if retrieval else None
    if g is not None:
        g.retrieve("주택 임대차")  # loads the retrieval tokenizer (Kiwi: ~2 s) now, not in the first request
        print(f"[kolora] grounded: {len(g.index.passages)} passages, {g.k} per question", file=sys.stderr, flush=True)
    elif grounding.corpus_paths(cfg):
        print("[kolora] --no-retrieval: answering without the run's passages", file=sys.stderr, flush=True)
    return State(run_dir.path.resolve().name, model, tokenizer, cfg, defaults, max_tokens_cap, max_body_bytes,
                 api_key or None, context, grounding=g, **settings)


def check_port_free(host: str, port: int) -> None:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise KoloraError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                          "pass another --port, or stop the program that uses it") from None


def parse_origins(values) -> tuple:
    """--allow-origin values (repeated, comma-separated) → normalized origins: scheme://host[:port],
    lower-case, no trailing slash; `*` allows any origin."""
    out = []
    for value in values or ():
        for item in value.split(","):
            item = item.strip().rstrip("/").lower()
            if not item:
                continue
            if item != "*":
                parts = urlsplit(item)
                if parts.scheme not in ("http", "https") or split_host(parts.netloc) is None or parts.path \
                        or parts.query or parts.fragment:
                    raise KoloraError(f"--allow-origin {item!r} is not an origin",
                                      "write scheme://host[:port], e.g. http://localhost:3000")
            if item not in out:
                out.append(item)
    return tuple(out)


def split_host(value: str, default_port: int = 80):
    """A Host header (or an origin's netloc) → (lower-case name without brackets, port), None if malformed."""
    try:
        parts = urlsplit("//" + value)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.password is not None or parts.path:
        return None
    return parts.hostname.lower(), default_port if port is None else port


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware in front of everything: refuses a `Host` that does not name this server (DNS
    rebinding: a page at evil.example whose name now points at 127.0.0.1 reads nothing) and an `Origin`
    other than this server's own pages or an --allow-origin (another site's page posting here), with
    403 and an OpenAI-style error body."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state
        bound = state.host.strip("[]").lower()
        self.names = {"localhost", "127.0.0.1", "::1", bound}
        self.any_ip = bound in ("0.0.0.0", "::")  # listening everywhere: reached by any of its addresses
        if self.any_ip:
            self.names.add(socket.gethostname().lower())
        self.any_origin = "*" in state.allow_origins
        self.origins = set(state.allow_origins)
        self.proxied = set()  # names of --allow-origin sites, for a reverse proxy that keeps their Host
        for origin in state.allow_origins:
            if origin != "*":
                parts = urlsplit(origin)
                self.proxied.add(split_host(parts.netloc, 443 if parts.scheme == "https" else 80))

    def host_ok(self, host: str) -> bool:
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        if parsed in self.proxied:
            return True
        if self.state.port is not None and port != self.state.port:
            return False
        return name in self.names or (self.any_ip and is_ip(name))

    def origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if self.any_origin or origin in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https"):
            return False  # "null" (sandboxed frames, file: pages) and the like
        # same origin: the page was loaded from the very Host it now calls (the scheme may differ
        # behind a TLS proxy); the Host itself has been checked
        default = 443 if parts.scheme == "https" else 80
        return split_host(parts.netloc, default) in (split_host(host, default), split_host(host))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        host = headers.get("host", "")
        error = None
        if not self.host_ok(host):
            error = ApiError(403, f"Host {host!r} does not name this server; use the address it listens on "
                                  "(or localhost / 127.0.0.1 with its port)", code="forbidden_host")
        elif "origin" in headers and not self.origin_ok(headers["origin"], host):
            error = ApiError(403, f"requests from web pages at Origin {headers['origin']!r} are not allowed; "
                                  "start the server with --allow-origin ORIGIN to allow them",
                             code="forbidden_origin")
        if error is None:
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


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
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

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
    if len(stop) > MAX_STOPS:
        raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings are allowed, got {len(stop)}", param="stop")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise ApiError(400, f"stop: a stop string may have at most {MAX_STOP_CHARS} characters, got one with "
                            f"{longest}", param="stop")
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

    def __init__(self, state: State, prompt: list[int], gen, stop: list[str], on_done=None):
        self.state, self.prompt, self.gen, self.stop = state, prompt, gen, stop
        self.on_done = on_done  # called once the job no longer needs the model (its queue place is free)
        self.cancel = threading.Event()
        self.streamer = _streamer(state.tokenizer, self.cancel)
        self.result = None
        self.error: BaseException | None = None
        self.hit_stop = False
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            if self._acquire():
                try:
                    rows, _ = generate_details(self.state.model, self.state.tokenizer, [self.prompt], self.gen,
                                               streamer=self.streamer)
                    self.result = rows[0]
                finally:
                    self.state.lock.release()
        except Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - reported to the client, not lost in a thread
            self.error = e
        finally:
            if self.on_done is not None:
                self.on_done()
            self.streamer.text_queue.put(None)

    def _acquire(self) -> bool:
        """Wait for the model; give up (False) as soon as the job is cancelled, so a client that left
        while queued frees its place at once."""
        while not self.state.lock.acquire(timeout=0.1):
            if self.cancel.is_set():
                return False
        if self.cancel.is_set():
            self.state.lock.release()
            return False
        return True

    def next_piece(self, timeout: float = 0.25):
        """Next raw piece of text, '' when none is ready yet, None at the end."""
        try:
            return self.streamer.text_queue.get(timeout=timeout)
        except queue.Empty:
            return ""

    @property
    def finish_reason(self) -> str:
        return "stop" if self.hit_stop or (self.result is not None and self.result.stopped) else "length"

    @property
    def completion_tokens(self) -> int:
        return self.result.new_tokens if self.result is not None else self.streamer.generated


class StopCutter:
    """Streams text but holds back what could be the start of a stop string, and ends at the first
    stop string that appears. Linear: one KMP matcher per stop string advances over each new
    character once, so a piece costs O(len(piece) × number of stops), never O(len(stop)²)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fail = [kmp_table(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # per stop: its longest prefix the text now ends with
        self.buffer, self.hit, self.started = "", False, False  # buffer: held-back text only

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.started:  # answers are shown without leading whitespace, as `kolora chat` does
            text = text.lstrip()
            self.started = bool(text)
        for i, ch in enumerate(text):
            for j, s in enumerate(self.stops):
                k = self.matched[j]
                while k and s[k] != ch:
                    k = self.fail[j][k - 1]
                if s[k] == ch:
                    k += 1
                if k == len(s):  # the first stop to complete: cut where it starts
                    self.hit = True
                    seen, self.buffer = self.buffer + text[:i + 1], ""
                    return seen[:len(seen) - k]
                self.matched[j] = k
        seen = self.buffer + text
        keep = max(self.matched, default=0)  # never more than the held-back text plus this piece
        self.buffer = seen[len(seen) - keep:] if keep else ""
        return seen[:len(seen) - keep]

    def flush(self) -> str:
        out, self.buffer = ("" if self.hit else self.buffer), ""
        return out.rstrip()


def kmp_table(s: str) -> list[int]:
    """fail[k]: length of the longest proper prefix of s[:k + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


async def texts(job: "Job", request):
    """The answer text as it is produced, stop strings cut out. Watches the client while it waits
    (in the queue or between pieces): one that disconnects sets the job's cancel event, which frees
    the queue place or stops generate() at its next token. Always cancels the job when it ends."""
    from starlette.concurrency import run_in_threadpool

    cutter = StopCutter(job.stop)
    try:
        while True:
            raw = await run_in_threadpool(job.next_piece, POLL_S)
            if raw is None:
                break
            if await request.is_disconnected():
                job.cancel.set()
                raise ClientGone()
            text = cutter.feed(raw)
            if text:
                yield text
            if cutter.hit:
                job.hit_stop = True
                job.cancel.set()
        await run_in_threadpool(job.thread.join)
        tail = cutter.flush()
        if tail:
            yield tail
    finally:
        job.cancel.set()


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


# --------------------------------------------------------------------------- app
def create_app(state: State):
    from fastapi import FastAPI, Request
    from fastapi.responses import (
        HTMLResponse,
        JSONResponse,
        Response,
        StreamingResponse,
    )
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .prompt import encode_prompt

    app = FastAPI(title="kolora", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind=kind).body(), status_code=e.status_code)

    expected_auth = f"Bearer {state.api_key}".encode()

    def authorize(request: Request) -> None:
        if not state.api_key:
            return
        given = request.headers.get("authorization", "").encode("latin-1")  # the bytes as sent
        if not hmac.compare_digest(given, expected_auth):  # constant time: no timing oracle for the key
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer …)", code="invalid_api_key",
                           kind="authentication_error")

    def require_json(request: Request) -> None:
        """Only JSON bodies: a page elsewhere can post a form or text/plain without a CORS preflight."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, not {ctype or 'missing'}",
                           code="unsupported_media_type")

    busy = [0]  # jobs admitted and not yet done: the one generating plus those waiting
    busy_lock = threading.Lock()

    def admit():
        """Take a place in the queue (429 when it is full); returns the callback that frees it."""
        with busy_lock:
            if busy[0] > state.max_queue:
                raise ApiError(429, f"the server is busy: one request is generating and {state.max_queue} are "
                                    "waiting (kolora serve --max-queue); retry later", code="queue_full",
                               kind="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
            busy[0] += 1
        released = []

        def release():
            with busy_lock:
                if not released:
                    released.append(True)
                    busy[0] -= 1
        return release

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
        require_json(request)
        ex, gen, stop, stream, include_usage = parse_request(await read_body(request), state)
        hits = None  # None: ungrounded (no `sources` in the reply); []: retrieval found nothing
        if state.grounding is not None:
            ex, hits = await run_in_threadpool(ground, state, ex)
        prompt = encode_prompt(state.tokenizer, ex, state.cfg.data.system_prompt, state.cfg.data.template)
        if state.context and len(prompt) + gen.max_new_tokens > state.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; with max_tokens {gen.max_new_tokens} it "
                                f"exceeds the model's context of {state.context}", param="messages",
                           code="context_length_exceeded")
        reply = Reply(state.name, len(prompt), Sources(state, ex.question, hits) if hits is not None else None)
        release = admit()
        try:
            job = Job(state, prompt, gen, stop, on_done=release)
        except BaseException:
            release()
            raise
        if stream:
            return StreamingResponse(sse(job, reply, include_usage, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = "".join([piece async for piece in texts(job, request)]).strip()
        except ClientGone:
            return Response(status_code=499)  # nobody reads it: the connection is gone
        if job.error is not None:
            raise ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}", kind="server_error")
        if reply.sources is not None:
            await run_in_threadpool(reply.sources.check, text)
        return reply.completion(text, job.finish_reason, job.completion_tokens)

    if state.allow_origins:  # pages at these origins need CORS headers (and preflights) to call the API
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(state.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(Guard, state=state)  # added last: runs first
    return app


def model_card(state: State) -> dict:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "kolora",
            "base_model": state.cfg.model.name, "max_tokens_cap": state.max_tokens_cap,
            "grounded": state.grounding is not None}


# --------------------------------------------------------------------------- grounding
def ground(state: State, ex):
    """The example with its retrieved passages as context (the prompt `kolora chat` builds), and the
    hits. Retrieval is serialised: the Kiwi tokenizer is one instance per process."""
    with state.ground_lock:
        [ex], [hits] = state.grounding.ground([ex], state.tokenizer)
    return ex, hits


@dataclass
class Sources:
    """The passages one answer was grounded in and, once the answer is written, which of them it cites
    and what the citation check could not find (`kolora chat`'s sources lines, as JSON)."""
    state: State
    question: str
    hits: list
    cited: set = field(default_factory=set)
    unsupported: list = field(default_factory=list)

    def check(self, answer: str) -> None:
        with self.state.ground_lock:
            report = self.state.grounding.check(answer, self.question, [])
        self.cited = {c.passage_id for c in report.citations if c.passage_id}
        self.unsupported = list(report.unsupported)

    def to_json(self) -> list[dict]:
        return [{"id": h.passage.id, "header": h.passage.header, "score": round(float(h.score), 4),
                 "text": h.passage.text, "cited": h.passage.id in self.cited} for h in self.hits]


@dataclass
class Reply:
    model: str
    prompt_tokens: int
    sources: Sources | None = None  # None: an ungrounded answer, no `sources` field
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def grounded(self, checked: bool = True) -> dict:
        """The fields beside OpenAI's: `sources` (and `unsupported` once the answer is checked)."""
        if self.sources is None:
            return {}
        out = {"sources": self.sources.to_json()}
        if checked:
            out["unsupported"] = self.sources.unsupported
        return out

    def completion(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason, "logprobs": None}],
                "usage": self.usage(completion_tokens), **self.grounded()}

    def chunk(self, delta: dict, finish_reason: str | None = None, extra: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **(extra or {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def sse(job: Job, reply: Reply, include_usage: bool, request):
    """Server-sent events in OpenAI's chunk format. A client that disconnects cancels the generation
    (the streamer raises inside generate), so the lock is freed for the next request."""
    from starlette.concurrency import run_in_threadpool

    try:
        yield reply.chunk({"role": "assistant", "content": ""}, extra=reply.grounded(checked=False))
        answer = []
        async for text in texts(job, request):
            answer.append(text)
            yield reply.chunk({"content": text})
        if job.error is not None:
            err = ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}", kind="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        if reply.sources is not None:
            await run_in_threadpool(reply.sources.check, "".join(answer).strip())
        yield reply.chunk({}, job.finish_reason, extra=reply.grounded())
        if include_usage:
            usage = {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
                     "model": reply.model, "choices": [], "usage": reply.usage(job.completion_tokens)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    except ClientGone:
        return
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
