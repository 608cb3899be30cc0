"""`pipeline()` and `Pipeline`: prompts in, responses out, over the engine (lmdeploy keeps these in api.py too;
a module named `pipeline` would shadow the function `lmdp.pipeline`).

Prompts may be strings (sent through the chat template unless do_preprocess=False), chat messages, or token ids
(a list, tuple, 1-D numpy array or tensor of ints), one or a list.

Errors. Every request is checked in full when it is submitted: its prompt, its token ids and every setting of its
GenerationConfig, against the model's vocabulary and session_len. A request that can't run, or that fails in a
step, comes back as an error Response: finish_reason 'error', `error` saying what was wrong and what to do, `text`
and `token_ids` holding whatever it had produced (usually nothing), `index` its place in the batch. The other
requests run as if it were not there: a batch call returns one Response per prompt, in order, errors included, and
raises only for a call that is wrong as a whole (no prompts, a gen_config that is no GenerationConfig, as many
configs as prompts), before anything runs. An async caller always gets its last Response (an error one included);
a stream ends with it.

Steps are driven by whoever waits for results: a batch or streaming call steps the engine in the calling thread,
and async callers share one driver task that steps it in a worker thread, so the event loop stays free. A lock
keeps steps one at a time, so both kinds of caller may share one pipeline. The driver runs while some async
request is unanswered and the engine has work for it; a request the engine no longer holds is answered with an
error rather than waited for.
"""
import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence

from . import validate
from .engine.engine import Engine
from .errors import PipelineClosedError, TensorParallelError
from .messages import GenerationConfig, PytorchEngineConfig, Response
from .request import Request, error_response
from .tokenizer import TextStream, Tokenizer

logger = logging.getLogger('lmdp')

GenConfigs = None | GenerationConfig | Sequence[GenerationConfig]


class Pipeline:
    """A model served by the engine. Call it with prompts; see `pipeline()`."""

    def __init__(self, model_path: str, backend_config: PytorchEngineConfig | None = None):
        from .preflight import preflight
        backend_config = backend_config or PytorchEngineConfig()
        if not isinstance(backend_config, PytorchEngineConfig):
            raise TypeError(f'backend_config must be a PytorchEngineConfig, got {type(backend_config).__name__}')
        if backend_config.tp > 1:
            _serve_if_worker(model_path, backend_config)
        # everything `lmdp check` checks, in its words, before any weight is read
        checked = preflight(model_path, backend_config)
        self.tokenizer: Tokenizer = checked.tokenizer
        self.gen_config: GenerationConfig = checked.gen_config
        self.engine: Engine | None = Engine(model_path, backend_config)
        vocab = self.engine.model_config.vocab_size
        eos = set(checked.eos_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        stray = sorted(t for t in eos if t >= vocab)
        if stray:
            logger.warning('eos ids %s (generation_config.json or the tokenizer) are outside the vocabulary [0, %d): '
                           'they can never be generated, so they are ignored as stop ids', stray, vocab)
        self._eos_ids = eos - set(stray)
        self._active: dict[int, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._driver: asyncio.Task | None = None
        self._closed = False
        self._broken: TensorParallelError | None = None

    def _check_open(self):
        if self._broken is not None:
            raise PipelineClosedError(f'this pipeline stopped: {self._broken}')
        if self._closed:
            raise PipelineClosedError('this pipeline was closed (close() or the end of its `with` block freed the '
                                      'engine); build a new one with lmdp.pipeline(...)')

    # -- requests ---------------------------------------------------------------------------------------------

    def _encode(self, prompt, do_preprocess: bool) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError('the prompt is empty; give some text')
            validate.text('the prompt', prompt)
            if do_preprocess and self.tokenizer.has_chat_template:
                return self._tokenize(self.tokenizer.encode_chat, [{'role': 'user', 'content': prompt}])
            return self._tokenize(self.tokenizer.encode, prompt)
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise ValueError('the prompt is empty; give some text, messages or token ids')
        if validate.is_token_ids(prompt) or hasattr(prompt, 'ndim'):
            return validate.token_ids('the prompt', prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            for i, message in enumerate(prompt):
                if not isinstance(message.get('role'), str):
                    raise ValueError(f"chat message {i} has no 'role' string (e.g. 'user'): {message!r}"[:200])
                content = message.get('content')
                if not isinstance(content, str):
                    raise TypeError(f"chat message {i}'s content must be a string, got {type(content).__name__}")
                validate.text(f'chat message {i}', content)
            return self._tokenize(self.tokenizer.encode_chat, list(prompt))
        raise TypeError(f'a prompt must be a string, a list of chat messages or a list of token ids, got '
                        f'{type(prompt).__name__}')

    @staticmethod
    def _tokenize(encode, arg) -> list[int]:
        try:
            return encode(arg)
        except ValueError:
            raise
        except Exception as e:           # the tokenizer or the chat template failed on this prompt alone
            raise ValueError(f'the prompt could not be tokenized ({type(e).__name__}: {e})') from e

    def _submit(self, index: int, prompt, gen_config: GenerationConfig, do_preprocess: bool,
                stream: bool) -> Request | Response:
        """Queue one prompt; an error Response when it can't run."""
        try:
            token_ids = self._encode(prompt, do_preprocess)
            self.engine.check_prompt(token_ids)
            params = self.engine.sampling_params(gen_config, self._eos_ids)
        except (TypeError, ValueError) as e:
            logger.warning('request %d refused: %s', index, e)
            return error_response(index, str(e))
        text = None
        if stream or gen_config.stop_words:
            text = TextStream(self.tokenizer, gen_config.skip_special_tokens, gen_config.stop_words,
                              gen_config.include_stop_str_in_output)
        request = Request(next(self._ids), index, len(token_ids), gen_config, params.stop_ids, stream, text)
        # known before the engine can emit anything for it (a step may be running in another thread)
        self._active[request.seq_id] = request
        try:
            self.engine.add_request(token_ids, params, request.seq_id)
        except (TypeError, ValueError) as e:
            del self._active[request.seq_id]
            return error_response(index, str(e))
        request.queued = True
        return request

    def _submit_all(self, prompts, gen_config: GenConfigs, do_preprocess: bool, stream: bool):
        self._check_open()
        prompts, _ = _as_batch(prompts)
        # the call as a whole is checked before any of it runs: an error here loses nothing
        configs = _per_prompt(self.gen_config if gen_config is None else gen_config, len(prompts))
        return [self._submit(i, p, g, do_preprocess, stream) for i, (p, g) in enumerate(zip(prompts, configs))]

    def _step(self):
        """One engine step, its outputs routed to their requests; never raises for a request's sake."""
        with self._lock:
            if self.engine is None:
                return
            try:
                outputs = self.engine.step()
            except TensorParallelError as e:   # a rank is gone: every request ends, and the caller hears why
                self._broken = e
                for request in list(self._active.values()):
                    request.fail(str(e))
                self._active.clear()
                self.engine = None
                raise
            except Exception as e:       # the engine isolates failures itself; this is the last line
                logger.exception('an engine step failed outside request isolation; failing every request')
                outputs = self.engine.abort_all('error', f'the engine failed ({type(e).__name__}: {e})')
            for out in outputs:
                request = self._active.get(out.seq_id)
                if request is None:
                    continue
                try:
                    if request.feed(out):
                        self.engine.abort(out.seq_id)
                except Exception as e:   # detokenising this request failed: it alone ends
                    logger.exception('request %d failed while its output was read', request.index)
                    request.fail(f'reading the output failed ({type(e).__name__}: {e})')
                    self.engine.abort(out.seq_id)
                if request.done:
                    del self._active[out.seq_id]
            if self._active and not self.engine.has_unfinished():
                # handed to the engine, yet the engine holds nothing: answer them instead of waiting forever
                for seq_id, request in list(self._active.items()):
                    if request.queued:
                        logger.error('request %d was lost by the engine', request.index)
                        request.fail('the engine lost this request (a bug in lmdp; please report it)')
                        del self._active[seq_id]

    def _drop(self, request: Request):
        """The caller stopped listening: forget the request; the engine frees it at its next step."""
        self._active.pop(request.seq_id, None)
        if self.engine is not None:
            self.engine.abort(request.seq_id)

    # -- batch, streaming, async ------------------------------------------------------------------------------

    def __call__(self, prompts, gen_config: GenConfigs = None, do_preprocess: bool = True,
                 use_tqdm: bool | None = None):
        return self.infer(prompts, gen_config, do_preprocess, use_tqdm)

    def infer(self, prompts, gen_config: GenConfigs = None, do_preprocess: bool = True,
              use_tqdm: bool | None = None) -> Response | list[Response]:
        """Run prompts to the end. One prompt gives one Response, a list gives a list in the same order.
        use_tqdm: a progress bar over the requests (None: for a batch, when stderr is a terminal)."""
        _, is_batch = _as_batch(prompts)
        requests = self._submit_all(prompts, gen_config, do_preprocess, stream=False)
        live = [r for r in requests if isinstance(r, Request)]
        from tqdm import tqdm
        # tqdm's disable=None: shown only when stderr is a terminal
        disable = True if not is_batch or use_tqdm is False else None if use_tqdm is None else False
        bar = tqdm(total=len(requests), desc='requests', unit='req', disable=disable)
        bar.update(len(requests) - len(live))
        remaining = live
        try:
            with bar:
                while remaining:
                    self._step()
                    still = [r for r in remaining if not r.done]
                    bar.update(len(remaining) - len(still))
                    remaining = still
        finally:
            for r in remaining:          # interrupted (Ctrl-C): the engine lets go of what did not finish
                if not r.done:
                    self._drop(r)
        responses = [r.response(self.tokenizer) if isinstance(r, Request) else r for r in requests]
        return responses if is_batch else responses[0]

    batch_infer = infer

    def stream_infer(self, prompts, gen_config: GenConfigs = None,
                     do_preprocess: bool = True) -> Iterator[Response]:
        """Responses carrying each prompt's newest piece of text and tokens (`index` says whose), as they come."""
        requests = self._submit_all(prompts, gen_config, do_preprocess, stream=True)
        live = []
        for r in requests:
            if isinstance(r, Response):
                yield r
            else:
                live.append(r)
        try:
            while live:
                self._step()
                for r in live:
                    while r.pending:
                        yield r.pending.popleft()
                live = [r for r in live if not r.done or r.pending]
        finally:
            for r in live:
                if not r.done:
                    self._drop(r)

    async def generate(self, prompt, gen_config: GenerationConfig | None = None,
                       do_preprocess: bool = True) -> AsyncIterator[Response]:
        """Stream one prompt's pieces in an asyncio program; many may run at once and share the batch. The last
        piece has a finish_reason; it is 'error', with `error` set, when the request could not run or failed."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._check_open()
        if gen_config is not None and not isinstance(gen_config, GenerationConfig):
            raise TypeError(f'gen_config must be a GenerationConfig, got {type(gen_config).__name__}')
        request = self._submit(0, prompt, gen_config or self.gen_config, do_preprocess, stream=True)
        if isinstance(request, Response):
            yield request
            return
        request.notify = lambda r: loop.call_soon_threadsafe(queue.put_nowait, r)
        if self._driver is None or self._driver.done() or self._driver.get_loop() is not loop:
            self._driver = loop.create_task(self._drive())
        try:
            while True:
                response = await queue.get()
                yield response
                if response.finish_reason is not None:
                    break
        finally:
            if not request.done:
                self._drop(request)
                # its blocks are freed at the next step: someone must run it, even if no other request waits
                if not loop.is_closed() and (self._driver is None or self._driver.done()):
                    self._driver = loop.create_task(self._drive())

    def abort_all(self):
        """Stop every request in flight (a server shutting down): each caller's last Response has finish_reason
        'abort', and the engine frees their blocks at its next step."""
        if self.engine is None:
            return
        for seq_id in list(self._active):
            self.engine.abort(seq_id)

    async def _drive(self):
        """Step the engine while an async request waits or an abort is still to be carried out; whatever stops it,
        every async waiter is answered."""
        try:
            while not self._closed and self.engine is not None and (self._active or self.engine.has_unfinished()):
                await asyncio.to_thread(self._step)
        except TensorParallelError:      # every request was answered with it; later calls raise it
            pass
        finally:
            waiting = [r for r in list(self._active.values()) if r.notify is not None and not r.done]
            for request in waiting:
                request.fail('the pipeline stopped serving async requests (it was closed, or its event loop '
                             'stopped)')
                self._drop(request)

    # -- prompt logits ----------------------------------------------------------------------------------------

    def get_logits(self, input_ids: list[int] | list[list[int]]):
        """float32 logits `[len, vocab]` of every position of each token-id prompt (a list, one per prompt)."""
        self._check_open()
        batch = _id_batch(input_ids)
        with self._lock:
            if not self._active:
                self.engine.step()        # lets go of requests whose callers stopped listening
            if self.engine.has_unfinished():
                raise RuntimeError("get_logits/get_ppl can't run while requests are in flight; call them between "
                                   'generation calls')
            return [self.engine.prompt_logits(ids) for ids in batch]

    def get_ppl(self, input_ids: list[int] | list[list[int]]) -> list[float]:
        """Per prompt, the mean negative log-likelihood of each token after the first, in nats (as lmdeploy
        returns it: exp() of it is the perplexity)."""
        import torch
        self._check_open()
        batch = _id_batch(input_ids)
        out = []
        for ids, logits in zip(batch, self.get_logits(batch)):
            if len(ids) < 2:
                raise ValueError('get_ppl needs prompts of at least two tokens')
            nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
            out.append(nll.item())
        return out

    def close(self):
        """Free the engine (weights and KV cache); the pipeline can't be used afterwards. Requests still running
        end with an error Response."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for request in list(self._active.values()):
                request.fail('the pipeline was closed while this request ran')
            self._active.clear()
            if self.engine is not None:
                self.engine.close()
            self.engine = None
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve_if_worker(model_path: str, config: PytorchEngineConfig):
    """Under torchrun every rank runs the script; on ranks other than 0 `pipeline()` serves rank 0's steps and then
    ends the process (SystemExit(0)) when rank 0 closes its pipeline."""
    from .engine.tp import env_rank
    launched = env_rank()
    if launched is not None and launched[0] != 0:
        from .engine.tp.worker import serve_env
        serve_env(model_path, config)


def _as_batch(prompts):
    """(list of prompts, whether the caller gave a batch)."""
    if isinstance(prompts, str):
        return [prompts], False
    if hasattr(prompts, 'tolist') and getattr(prompts, 'ndim', None) in (1, 2):
        return ([prompts], False) if prompts.ndim == 1 else (list(prompts), True)
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError('no prompts given')
        if validate.is_token_ids(prompts) or all(isinstance(m, dict) for m in prompts):
            return [prompts], False
        return list(prompts), True
    raise TypeError(f'prompts must be a string, messages, token ids or a list of them, got {type(prompts).__name__}')


def _per_prompt(gen_config, n: int) -> list[GenerationConfig]:
    if isinstance(gen_config, GenerationConfig):
        return [gen_config] * n
    if not isinstance(gen_config, (list, tuple)):
        raise TypeError(f'gen_config must be a GenerationConfig or a list of them (one per prompt), got '
                        f'{type(gen_config).__name__}' + ('; build one with GenerationConfig(**your_dict)'
                                                          if isinstance(gen_config, dict) else ''))
    configs = list(gen_config)
    if len(configs) != n:
        raise ValueError(f'{len(configs)} generation configs for {n} prompts')
    for i, g in enumerate(configs):
        if not isinstance(g, GenerationConfig):
            raise TypeError(f'gen_config[{i}] must be a GenerationConfig, got {type(g).__name__}')
    return configs


def _id_batch(input_ids) -> list[list[int]]:
    """get_logits' argument as a list of token-id prompts."""
    if validate.is_token_ids(input_ids):
        return [validate.token_ids('input_ids', input_ids)]
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise TypeError('input_ids must be a list of token ids or a list of such lists')
    return [validate.token_ids(f'input_ids[{i}]', ids) for i, ids in enumerate(input_ids)]


def pipeline(model_path: str, backend_config: PytorchEngineConfig | None = None,
             log_level: str | None = None, **kwargs) -> Pipeline:
    """Load a checkpoint folder and serve it: `pipeline(path, backend_config=PytorchEngineConfig(...))`."""
    if log_level is not None:
        logging.getLogger('lmdp').setLevel(log_level)
    if kwargs:
        logger.warning('pipeline(): ignoring unsupported arguments %s', sorted(kwargs))
    return Pipeline(model_path, backend_config)
