"""``chatft serve``: an OpenAI-compatible HTTP server and a web chat page, on aiohttp.

Routes::

    GET  /                      the web chat page (static/index.html, no external assets)
    GET  /config                model id, default persona, context length, whether a key is needed
    GET  /health                status and engine counters (running, waiting, cancelled, ...)
    GET  /v1/models             the one model
    POST /v1/chat/completions   chat completions, JSON or server-sent events (stream: true)

The event loop only parses, tokenizes (in the default executor) and relays: the model runs
on the :class:`~chatft.serve.engine.Engine` worker thread, which hands each request's events
back through ``loop.call_soon_threadsafe`` into that request's own queue. A slow client
therefore only fills its own queue, and a client that disconnects cancels its request:
aiohttp cancels the handler (``handler_cancellation``) or the next write fails, and the
handler's ``finally`` removes the sequence from the batch.

Seeds: every request samples from its own generator, seeded with ``seed`` when given, and
consumes one draw per sampled token, so the random stream of a request does not depend on
the requests batched with it. Its logits can still differ by floating-point noise between
batch shapes (different padding and matrix sizes), which changes a token only at a near-tie;
in practice a seeded request returns the same text alone or under load, but bit-exact
reproducibility is only promised for the same batch composition.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) for every
4xx/5xx, including 404/405 and bodies over ``MAX_BODY`` (413). A malformed request gets a 4xx
naming the field; an exception no rule foresaw becomes a JSON 500 that says nothing of the
internals, and its traceback is logged once. Requests that are not HTTP at all (bad request
lines or headers) are answered by aiohttp's parser with a plain-text 400; they are logged as
one line, without a traceback.

Without an API key, only requests addressed to this machine are answered (``Host``), and
POSTs only from the server's own page (``Origin``): see :mod:`chatft.serve.hosts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import signal
import sys
import threading
import time
from importlib import resources

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from chatft.serve.batch import Event, SamplingParams
from chatft.serve.engine import Engine
from chatft.serve.generate import ChatModel
from chatft.serve.hosts import HostPolicy, is_loopback, split_host
from chatft.serve.protocol import (ApiError, ChatRequest, chunk_body, completion_body,
                                   completion_id, decode_body, error_body, parse_request, usage)

log = logging.getLogger("chatft.serve")

MAX_BODY = 1024 * 1024
"""Largest request body accepted (bytes); larger ones get 413."""

DEFAULT_MAX_TOKENS = 1024
"""Answer length when a request sets no max_tokens (less if the context leaves less)."""

ENGINE = web.AppKey("engine", Engine)
SETTINGS = web.AppKey("settings", dict)
HOSTS = web.AppKey("hosts", HostPolicy)

INTERNAL_ERROR = "internal server error (the server log has the details)"


def _client_fault(exc: BaseException | None) -> str | None:
    """One line saying what was wrong, if ``exc`` is aiohttp refusing what a client sent: a
    bad request line or header, or a body it cannot decode (bad chunked framing, bad gzip).
    aiohttp's own text reads "400, message:\n  <what>" over several lines."""
    if not isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
        return None
    what = " ".join(str(getattr(exc, "message", None) or exc).split())
    return re.sub(r"^\d{3}, message: ?", "", what)


class _OneLine(logging.Filter):
    """aiohttp logs a client's fault with a traceback: a request its parser refuses
    (answered with a plain-text 400), or, after the handler answered, an undecodable body
    it drains. Keep one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        what = _client_fault(record.exc_info[1] if record.exc_info else None)
        if what is not None:
            record.msg = f"{record.getMessage()}: {what}"
            record.args, record.exc_info, record.exc_text = None, None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_http_log = logging.getLogger("chatft.serve.http")
_http_log.addFilter(_OneLine())


def _json_error(status: int, message: str, type: str, param: str | None = None,
                code: str | None = None, headers: dict | None = None) -> web.Response:
    return web.json_response(error_body(message, type, param, code), status=status,
                             headers=headers)


@web.middleware
async def _errors(request: web.Request, handler):
    """Every error leaves as OpenAI-shaped JSON (aiohttp's own 404/405/413 included)."""
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        message = e.text if e.text and not e.text.startswith(str(e.status)) else e.reason
        if e.status == 413:
            message = f"request body too large (limit {MAX_BODY} bytes)"
        return _json_error(e.status, message, kind,
                           code={404: "not_found", 405: "method_not_allowed",
                                 413: "request_too_large"}.get(e.status))
    except (HttpProcessingError, web.RequestPayloadError) as e:
        return _json_error(400, f"the request body cannot be read: {_client_fault(e)}",
                           "invalid_request_error")
    except ConnectionError:  # the client left while we read: nobody to answer
        log.debug("client %s left during %s %s", request.remote, request.method, request.path)
        return _json_error(400, "connection closed", "invalid_request_error")
    except Exception:
        # A bug, not the client's fault: the client gets no internals, the log gets the
        # traceback (once: aiohttp never sees this exception). _stream does the same once
        # its headers are sent.
        _log_internal_error(request)
        return _json_error(500, INTERNAL_ERROR, "server_error", code="internal_error")


def _log_internal_error(request: web.Request) -> None:
    log.exception("internal error answering %s %s", request.method, request.path)


@web.middleware
async def _hosts(request: web.Request, handler):
    """Without an API key: answer only this machine's names, and POSTs only from this
    server's own page (see chatft.serve.hosts for the attacks this closes)."""
    policy = request.app[HOSTS]
    if not request.app[SETTINGS]["api_key"]:
        host = request.headers.get("Host")
        if not policy.host_allowed(host):
            return _json_error(403, policy.refusal("Host", host or ""), "invalid_request_error",
                               code="host_not_allowed")
        origin = request.headers.get("Origin")
        if request.method not in ("GET", "HEAD", "OPTIONS") and \
                not policy.origin_allowed(origin, host):
            return _json_error(403, policy.refusal("Origin", origin or ""),
                               "invalid_request_error", code="origin_not_allowed")
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler):
    key = request.app[SETTINGS]["api_key"]
    if key and request.path.startswith("/v1/"):
        given = request.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and
                hmac.compare_digest(given[7:].encode(), key.encode())):
            return _json_error(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                               "<key>' with the key the server was started with",
                               "invalid_request_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def _index(request: web.Request) -> web.Response:
    html = resources.files("chatft.serve").joinpath("static/index.html").read_text("utf-8")
    return web.Response(text=html, content_type="text/html", charset="utf-8")


async def _config(request: web.Request) -> web.Response:
    cm = request.app[ENGINE].cm
    return web.json_response({"model": cm.name, "system_prompt": cm.system_prompt,
                              "max_context": cm.max_context,
                              "auth_required": bool(request.app[SETTINGS]["api_key"])})


async def _health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response({"status": "ok", "model": engine.cm.name, **engine.stats()})


def _model_card(request: web.Request) -> dict:
    return {"id": request.app[ENGINE].cm.name, "object": "model",
            "created": request.app[SETTINGS]["started"], "owned_by": "chatft"}


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request)]})


async def _model(request: web.Request) -> web.Response:
    if request.match_info["name"] != request.app[ENGINE].cm.name:
        raise ApiError(f"model {request.match_info['name']!r} does not exist", status=404,
                       code="model_not_found", param="model")
    return web.json_response(_model_card(request))


async def _read_request(request: web.Request) -> ChatRequest:
    raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
    return parse_request(decode_body(raw))


def _sampling(engine: Engine, req: ChatRequest, prompt_len: int) -> SamplingParams:
    cm = engine.cm
    room = cm.max_context - prompt_len
    if room < 1:
        raise ApiError(f"the conversation is {prompt_len} tokens; the model's context is "
                       f"{cm.max_context}, leaving no room for an answer", param="messages",
                       code="context_length_exceeded")
    if req.max_tokens is not None and req.max_tokens > room:
        raise ApiError(f"{req.max_tokens_param} is {req.max_tokens}, but the model's context is "
                       f"{cm.max_context} tokens and the messages take {prompt_len}: at most "
                       f"{room} tokens are left for the answer", param=req.max_tokens_param,
                       code="context_length_exceeded")
    max_new = req.max_tokens if req.max_tokens is not None else min(room, DEFAULT_MAX_TOKENS)
    return cm.sampling(temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_new,
                       seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos, top_k=req.top_k,
                       repetition_penalty=req.repetition_penalty)


async def _completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    settings = request.app[SETTINGS]
    req = await _read_request(request)
    if engine.waiting >= settings["max_waiting"]:
        raise ApiError(f"the server has {engine.waiting} requests waiting; try again later",
                       status=503, type="server_error", code="overloaded")
    loop = asyncio.get_running_loop()
    cm = engine.cm
    prompt_ids = await loop.run_in_executor(None, cm.prompt_ids, req.messages)
    params = _sampling(engine, req, len(prompt_ids))
    events: asyncio.Queue[Event] = asyncio.Queue()
    seq = cm.sequence(prompt_ids, params,
                      lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    engine.submit(seq)
    try:
        if req.stream:
            return await _stream(request, req, cm.name, events)
        parts: list[str] = []
        while True:
            ev = await events.get()
            parts.append(ev.text)
            if ev.finish_reason is not None:
                break
        if ev.finish_reason == "error":
            raise ApiError(ev.error or "generation failed", status=500, type="server_error")
        return web.json_response(completion_body(completion_id(), cm.name, "".join(parts),
                                                 ev.finish_reason, ev.prompt_tokens,
                                                 ev.completion_tokens))
    finally:
        if seq.finish_reason is None:  # client gone (or the handler failed): free the row
            engine.cancel(seq)


async def _stream(request: web.Request, req: ChatRequest, model: str,
                  events: asyncio.Queue[Event]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    # From here on a failure can no longer be a JSON error response: it ends the stream.
    try:
        await _relay(resp, req, model, events)
    except ConnectionError:  # the client left; the caller's finally frees its row
        log.debug("client %s left during a stream", request.remote)
    except Exception:
        _log_internal_error(request)
        with contextlib.suppress(ConnectionError):
            await _event(resp, error_body(INTERNAL_ERROR, "server_error", code="internal_error"))
            await _event(resp, "[DONE]")
    return resp


async def _relay(resp: web.StreamResponse, req: ChatRequest, model: str,
                 events: asyncio.Queue[Event]) -> None:
    """The answer's events as chat.completion.chunk events, then ``[DONE]``."""
    cid, created = completion_id(), int(time.time())

    async def send(body: dict | str) -> None:
        await _event(resp, body)

    await send(chunk_body(cid, created, model, {"role": "assistant", "content": ""}))
    while True:
        ev = await events.get()
        if ev.text:
            # Coalesce what arrived meanwhile (a slow client gets fewer, larger chunks).
            text = [ev.text]
            while ev.finish_reason is None and not events.empty():
                ev = events.get_nowait()
                text.append(ev.text)
            await send(chunk_body(cid, created, model, {"content": "".join(text)}))
        if ev.finish_reason is not None:
            break
    if ev.finish_reason == "error":
        await send(error_body(ev.error or "generation failed", "server_error"))
    else:
        await send(chunk_body(cid, created, model, {}, ev.finish_reason))
        if req.include_usage:
            await send(chunk_body(cid, created, model, {}, with_usage=usage(
                ev.prompt_tokens, ev.completion_tokens), empty_choices=True))
    await send("[DONE]")
    await resp.write_eof()


async def _event(resp: web.StreamResponse, body: dict | str) -> None:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    await resp.write(f"data: {data}\n\n".encode())


def build_app(engine: Engine, api_key: str | None = None, max_waiting: int = 1024,
              hosts: HostPolicy | None = None) -> web.Application:
    """The aiohttp application around a started :class:`Engine`. ``hosts``: the names
    answered without an API key (default: loopback only)."""
    app = web.Application(middlewares=[_errors, _hosts, _auth], client_max_size=MAX_BODY)
    app[ENGINE] = engine
    app[HOSTS] = hosts or HostPolicy()
    app[SETTINGS] = {"api_key": api_key, "max_waiting": max_waiting, "started": int(time.time())}
    app.router.add_get("/", _index)
    app.router.add_get("/config", _config)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{name}", _model)
    app.router.add_post("/v1/chat/completions", _completions)
    return app


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    # handler_cancellation: a client that disconnects cancels its handler, whose finally
    # cancels the generation.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, logger=_http_log)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]


def serve(cm: ChatModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch_size: int = 32, allowed_hosts: str | None = None) -> None:
    """Run the server until SIGINT/SIGTERM (blocking); prints the URL once listening.
    ``allowed_hosts``: ``--allowed-hosts``, names answered without an API key besides
    loopback and ``host`` (comma-separated; ``*``: any)."""
    hosts = HostPolicy.parse(host, allowed_hosts)
    if not is_loopback(split_host(host)[0]) and not api_key:
        named = "" if hosts.open else (
            " Requests are answered only when addressed to "
            f"{', '.join(('localhost', host) + hosts.allowed)}; --allowed-hosts adds this "
            "machine's other names and addresses.")
        print(f"chatft: warning: serving on {host} without --api-key: anyone who can reach this "
              f"machine can use the model.{named}", file=sys.stderr)
    engine = Engine(cm, max_batch_size=max_batch_size).start()

    async def main() -> None:
        runner, bound = await _start(build_app(engine, api_key, hosts=hosts), host, port)
        shown = f"[{host}]" if ":" in host else host
        print(f"chatft: serving {cm.name} on http://{shown}:{bound} (web chat at /, OpenAI API "
              f"at /v1)", flush=True)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        try:
            await done.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        engine.stop()


class BackgroundServer:
    """The same server on a thread of the calling process (tests, benchmarks, notebooks)::

        with BackgroundServer(engine) as url:   # url = "http://127.0.0.1:<port>"
            ...
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, allowed_hosts: str | None = None):
        self.engine, self.host, self.port, self.api_key = engine, host, port, api_key
        self.hosts = HostPolicy.parse(host, allowed_hosts)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chatft-http",
                                        daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> str:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            _start(build_app(self.engine, self.api_key, hosts=self.hosts), self.host, self.port),
            self._loop)
        self._runner, bound = fut.result()
        self.url = f"http://{self.host}:{bound}"
        return self.url

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
