"""The FastAPI app: the OpenAI routes over one pipeline, its errors, its streams and its disconnects.

Each HTTP request becomes engine requests through `Pipeline.generate`, so requests from every client share the
continuous batch and the prefix cache, and are checked exactly as `pipeline()` checks them. A request is answered
with its status only once the engine has taken it (its first piece is back), so a refused prompt is a 400, not a
stream that breaks. A client that goes away cancels its requests: a stream is cancelled by Starlette when the
connection drops, a plain request by `_unless_disconnected`; either way `Pipeline.generate` aborts the request
and the engine frees its KV blocks at its next step.
"""
import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response as HTTPResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..messages import Response
from .metrics import ServerMetrics
from .output import DONE, Choice, Formatter, sse
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_message

logger = logging.getLogger('lmdp.serve')

Started = list[tuple[Response, AsyncIterator[Response]]]     # per prompt: its first piece, the rest


class Server:
    """What the routes share: the pipeline, the served name, the key, the sampling defaults and the metrics."""

    def __init__(self, pipe, model_name: str, api_key: str | None = None,
                 sampling_defaults: dict[str, float] | None = None):
        self.pipe, self.model_name, self.api_key = pipe, model_name, api_key
        self.sampling_defaults = dict(sampling_defaults or {})
        self.metrics = ServerMetrics(model_name)
        self.draining = False
        self.created = int(time.time())
        self.token_text = functools.lru_cache(maxsize=65536)(
            lambda t: pipe.tokenizer.decode([t], skip_special_tokens=False))

    @property
    def session_len(self) -> int:
        return self.pipe.engine.session_len

    def check_key(self, request: Request):
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get('authorization', '').partition(' ')
        if scheme.lower() != 'bearer' or not token.strip():
            raise APIError(401, 'no API key given: this server needs the header "Authorization: Bearer <key>" '
                           'with the key it was started with (--api-key)', code='missing_api_key')
        if not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, 'the API key is not the one this server was started with (--api-key)',
                           code='invalid_api_key')

    def check_model(self, name: str):
        if name != self.model_name:
            raise APIError(404, f'the model {name!r} does not exist here; this server serves {self.model_name!r} '
                           '(GET /v1/models lists it)', param='model', code='model_not_found')

    def model_card(self) -> dict:
        return {'id': self.model_name, 'object': 'model', 'created': self.created, 'owned_by': 'lmdp',
                'max_model_len': self.session_len}

    def drain(self, grace: float):
        """Shutdown has begun: refuse new requests, and abort those still running `grace` seconds from now (their
        streams end with finish_reason 'abort', their plain requests with a 503)."""
        self.draining = True
        asyncio.get_running_loop().call_later(grace, self.pipe.abort_all)

    # -- a request's life ---------------------------------------------------------------------------------------

    async def start(self, prompts: list, gen_config, do_preprocess: bool) -> Started:
        """Submit every prompt and wait for each one's first piece; APIError(400), with nothing left running, when
        the engine refuses any of them."""
        if self.draining:
            raise APIError(503, 'the server is shutting down; send the request elsewhere or later',
                           type='service_unavailable')
        gens = [self.pipe.generate(p, gen_config, do_preprocess) for p in prompts]
        try:
            firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        except BaseException:
            await _close(gens)
            raise
        problems = []
        for i, first in enumerate(firsts):
            if isinstance(first, (ValueError, TypeError)) or _is_template_error(first):
                problems.append((i, str(first)))
            elif isinstance(first, BaseException):
                await _close(gens)
                raise first
            elif first.finish_reason == 'error':
                problems.append((i, first.error))
        if problems:
            await _close(gens)
            self.metrics.count_finished('error')
            if len(prompts) == 1:
                raise APIError(400, problems[0][1], param='messages' if do_preprocess else 'prompt')
            raise APIError(400, '; '.join(f'prompt {i}: {m}' for i, m in problems), param='prompt')
        return list(zip(firsts, gens))

    async def pieces(self, started: Started) -> AsyncIterator[tuple[int, Response]]:
        """(choice index, piece) as they come, from every prompt of the request."""
        if len(started) == 1:
            first, rest = started[0]
            yield 0, first
            if first.finish_reason is None:
                async for piece in rest:
                    yield 0, piece
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, first, rest):
            await queue.put((i, first))
            try:
                if first.finish_reason is None:
                    async for piece in rest:
                        await queue.put((i, piece))
            except Exception as e:          # the others go on; this one ends with its error
                logger.exception('prompt %d of a request failed', i)
                await queue.put((i, Response('', 0, 0, 'error', index=i, error=f'{type(e).__name__}: {e}')))

        tasks = [asyncio.ensure_future(pump(i, f, r)) for i, (f, r) in enumerate(started)]
        try:
            remaining = len(started)
            while remaining:
                i, piece = await queue.get()
                remaining -= piece.finish_reason is not None
                yield i, piece
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def account(self, choice: Choice, piece: Response):
        choice.add(piece)
        self.metrics.count_tokens(len(piece.token_ids))
        if piece.finish_reason is not None:
            self.metrics.count_finished(piece.finish_reason, choice.prompt_tokens)

    async def collect(self, started: Started, fmt: Formatter) -> dict:
        choices = [Choice(i) for i in range(len(started))]
        pieces = self.pieces(started)
        try:
            async for i, piece in pieces:
                self.account(choices[i], piece)
        finally:
            await self._let_go(pieces, started, choices)
        failed = [c for c in choices if c.finish_reason == 'error']
        if failed:
            raise APIError(500, f'the engine failed the request: {failed[0].error}', type='internal_server_error')
        if any(c.finish_reason == 'abort' for c in choices):
            raise APIError(503, 'the server shut down before the request finished', type='service_unavailable')
        return fmt.body(choices)

    async def stream(self, started: Started, fmt: Formatter, include_usage: bool) -> AsyncIterator[str]:
        choices = [Choice(i) for i in range(len(started))]
        pieces = self.pieces(started)
        try:
            if fmt.chat:
                for c in choices:
                    yield fmt.chunk(c.index, text='', role=True)
            async for i, piece in pieces:
                self.account(choices[i], piece)
                if piece.finish_reason == 'error':
                    yield sse(APIError(500, f'the engine failed the request: {piece.error}',
                                       type='internal_server_error').body())
                    continue
                if piece.text or (piece.token_ids and fmt.top_logprobs is not None):
                    yield fmt.chunk(i, text=piece.text, piece=piece)
                if piece.finish_reason is not None:
                    yield fmt.chunk(i, finish_reason=piece.finish_reason)
            if include_usage:
                yield fmt.usage_chunk(choices)
            yield DONE
        except Exception as e:               # the status is sent already: say so in the stream
            logger.exception('a stream failed')
            yield sse(APIError(500, f'internal error: {type(e).__name__}: {e}', type='internal_server_error').body())
            yield DONE
        finally:
            await self._let_go(pieces, started, choices)

    async def _let_go(self, pieces, started: Started, choices: list[Choice]):
        """Close the pipeline streams of a request that ends, aborting any unfinished one (at once: not when the
        garbage collector gets to them)."""
        for c in choices:
            if c.finish_reason is None:
                self.metrics.count_finished('abort', c.prompt_tokens)
        await _close([pieces] + [rest for _, rest in started])


class _ClosingStream(StreamingResponse):
    """Closes its body when the response ends, however it ends: Starlette cancels a stream whose client hung up
    but leaves the generator suspended, and the requests inside it would run on until it is collected."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _close(gens):
    for g in gens:
        with contextlib.suppress(Exception):
            await g.aclose()


def _is_template_error(e) -> bool:
    import jinja2
    return isinstance(e, jinja2.TemplateError)


async def _wait_for_disconnect(request: Request):
    while (await request.receive())['type'] != 'http.disconnect':
        pass


async def _unless_disconnected(request: Request, work):
    """Run a handler, cancelling it (and so its engine requests) when the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        logger.info('client went away; its request is cancelled')
        return HTTPResponse(status_code=499)     # nobody reads it
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


def build_app(server: Server) -> FastAPI:
    """The FastAPI app serving `server`'s pipeline: /v1/models, /v1/completions, /v1/chat/completions, /health,
    /metrics."""
    app = FastAPI(title='lmdp', docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def error(status: int, body: dict) -> JSONResponse:
        server.metrics.count_error(status)
        headers = {'WWW-Authenticate': 'Bearer'} if status == 401 else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error(e.status, e.body())

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        return error(400, APIError(400, validation_message(e.errors())).body())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = 'not_found_error' if e.status_code == 404 else 'invalid_request_error'
        return error(e.status_code, APIError(e.status_code, str(e.detail), type=kind).body())

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):
        logger.exception('unexpected error')
        return error(500, APIError(500, f'internal error: {type(e).__name__}: {e}',
                                   type='internal_server_error').body())

    @app.get('/health')
    async def health():
        return {'status': 'ok'}

    @app.get('/metrics')
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.pipe.engine),
                                 media_type='text/plain; version=0.0.4; charset=utf-8')

    v1 = APIRouter(prefix='/v1', dependencies=[Depends(server.check_key)])

    @v1.get('/models')
    async def models():
        return {'object': 'list', 'data': [server.model_card()]}

    @v1.get('/models/{name:path}')
    async def model(name: str):
        server.check_model(name)
        return server.model_card()

    @v1.post('/completions')
    async def completions(body: CompletionRequest, request: Request):
        return await _unless_disconnected(request, _generate(server, body, chat=False))

    @v1.post('/chat/completions')
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _unless_disconnected(request, _generate(server, body, chat=True))

    app.include_router(v1)
    return app


async def _generate(server: Server, req, chat: bool):
    server.check_model(req.model)
    req.refuse_unsupported()
    if chat:
        prompts = [[m.as_template_input() for m in req.messages]]
        max_tokens = req.requested_max_tokens()
        top = (req.top_logprobs or 0) if req.logprobs else None
    else:
        prompts = req.prompts()
        max_tokens = req.max_tokens
        top = req.logprobs
    # without max_tokens a request may run to the end of its session (the engine stops it there)
    max_new = server.session_len if max_tokens is None else min(max_tokens, server.session_len)
    try:
        gen_config = req.generation_config(max_new, None if top is None else max(top, 1), server.sampling_defaults)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    started = await server.start(prompts, gen_config, do_preprocess=chat)
    fmt = Formatter(chat, server.model_name, server.token_text, top)
    if req.stream:
        return _ClosingStream(server.stream(started, fmt, req.include_usage), media_type='text/event-stream',
                                 headers={'Cache-Control': 'no-cache'})
    return JSONResponse(await server.collect(started, fmt))
