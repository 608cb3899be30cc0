"""`pipeline()` and `Pipeline`: prompts in, responses out, over the engine (lmdeploy keeps these in api.py too;
a module named `pipeline` would shadow the function `lmdp.pipeline`).

Prompts may be strings (sent through the chat template unless do_preprocess=False), chat messages, or token ids,
one or a list. A request that can't run (an empty prompt, one longer than session_len, ...) comes back as a
Response with finish_reason 'error' and the reason in `error`; the rest of its batch runs as if it were not there.

Steps are driven by whoever waits for results: a batch or streaming call steps the engine in the calling thread,
and async callers share one driver task that steps it in a worker thread, so the event loop stays free. A lock
keeps steps one at a time, so both kinds of caller may share one pipeline.
"""
import asyncio
import collections
import itertools
import logging
import threading
from typing import AsyncIterator, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Union

from .engine.engine import Engine, EngineOutput
from .messages import GenerationConfig, PytorchEngineConfig, Response
from .tokenizer import TextStream, Tokenizer

logger = logging.getLogger('lmdp')

GenConfigs = Union[None, GenerationConfig, Sequence[GenerationConfig]]


class _Request:
    """One prompt's progress: its tokens as they come, its text, its finish."""

    def __init__(self, seq_id: int, index: int, input_len: int, gen_config: GenerationConfig, stop_ids,
                 stream: bool, text: Optional[TextStream]):
        self.seq_id, self.index, self.input_len, self.gen_config = seq_id, index, input_len, gen_config
        self.stop_ids, self.stream, self.text = stop_ids, stream, text
        self.token_ids: List[int] = []
        self.logprobs: Optional[List[Dict[int, float]]] = [] if gen_config.logprobs else None
        self.finish_reason: Optional[str] = None
        self.pending: Deque[Response] = collections.deque()    # streamed pieces not yet handed out
        self.notify: Optional[Callable[[Response], None]] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, out: EngineOutput) -> bool:
        """Take one step's output; True when a stop word has appeared (the engine must drop the request)."""
        new_ids, hit = [], False
        token = out.token_id
        hidden_stop = out.finish_reason == 'stop' and token in self.stop_ids and \
            not self.gen_config.include_stop_str_in_output
        if token is not None and not hidden_stop:
            new_ids = [token]
            self.token_ids.append(token)
            if self.logprobs is not None and out.logprobs is not None:
                self.logprobs.append(out.logprobs)
        piece = ''
        if self.text is not None:
            piece, hit = self.text.push(new_ids)
        reason = 'stop' if hit else out.finish_reason
        if reason is not None:
            self.finish_reason = reason
            if self.text is not None:
                piece += self.text.finish()
        if self.stream:
            lps = self.logprobs[-len(new_ids):] if self.logprobs is not None and new_ids else None
            self._emit(Response(piece, len(self.token_ids), self.input_len, self.finish_reason, new_ids, lps,
                                self.index))
        return hit

    def _emit(self, response: Response):
        if self.notify is not None:
            self.notify(response)
        else:
            self.pending.append(response)

    def response(self, tokenizer: Tokenizer) -> Response:
        text = self.text.text if self.text is not None else \
            tokenizer.decode(self.token_ids, self.gen_config.skip_special_tokens)
        return Response(text, len(self.token_ids), self.input_len, self.finish_reason, list(self.token_ids),
                        self.logprobs, self.index)


def _error(index: int, message: str) -> Response:
    return Response('', 0, 0, 'error', index=index, error=message)


class Pipeline:
    """A model served by the engine. Call it with prompts; see `pipeline()`."""

    def __init__(self, model_path: str, backend_config: Optional[PytorchEngineConfig] = None):
        from .hf_config import read_config_dict
        backend_config = backend_config or PytorchEngineConfig()
        read_config_dict(model_path)      # a missing or broken checkpoint is named before anything loads
        self.tokenizer = Tokenizer(model_path, backend_config.trust_remote_code)
        self.engine = Engine(model_path, backend_config)
        self.gen_config = GenerationConfig.from_pretrained(model_path)
        self._eos_ids = set(_checkpoint_eos_ids(model_path))
        if self.tokenizer.eos_token_id is not None:
            self._eos_ids.add(self.tokenizer.eos_token_id)
        self._active: Dict[int, _Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._driver: Optional[asyncio.Task] = None

    # -- requests ---------------------------------------------------------------------------------------------

    def _encode(self, prompt, do_preprocess: bool) -> List[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError('the prompt is empty; give some text')
            if do_preprocess and self.tokenizer.has_chat_template:
                return self.tokenizer.encode_chat([{'role': 'user', 'content': prompt}])
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError('the prompt is empty; give some text, messages or token ids')
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return list(prompt)
            if all(isinstance(m, dict) for m in prompt):
                return self.tokenizer.encode_chat(list(prompt))
        raise ValueError(f'a prompt must be a string, a list of chat messages or a list of token ids, got '
                         f'{type(prompt).__name__}')

    def _submit(self, index: int, prompt, gen_config: GenerationConfig, do_preprocess: bool,
                stream: bool) -> Union[_Request, Response]:
        """Queue one prompt; an error Response when it can't run."""
        try:
            token_ids = self._encode(prompt, do_preprocess)
            params = self.engine.sampling_params(gen_config, self._eos_ids)
            self.engine.check_prompt(token_ids)
        except ValueError as e:
            logger.warning('request %d refused: %s', index, e)
            return _error(index, str(e))
        text = None
        if stream or gen_config.stop_words:
            text = TextStream(self.tokenizer, gen_config.skip_special_tokens, gen_config.stop_words,
                              gen_config.include_stop_str_in_output)
        request = _Request(next(self._ids), index, len(token_ids), gen_config, params.stop_ids, stream, text)
        # known before the engine can emit anything for it (a step may be running in another thread)
        self._active[request.seq_id] = request
        self.engine.add_request(token_ids, params, request.seq_id)
        return request

    def _submit_all(self, prompts, gen_config: GenConfigs, do_preprocess: bool, stream: bool):
        prompts, _ = _as_batch(prompts)
        configs = _per_prompt(gen_config or self.gen_config, len(prompts))
        return [self._submit(i, p, g, do_preprocess, stream) for i, (p, g) in enumerate(zip(prompts, configs))]

    def _step(self):
        """One engine step, its outputs routed to their requests."""
        with self._lock:
            for out in self.engine.step():
                request = self._active.get(out.seq_id)
                if request is None:
                    continue
                if request.feed(out):
                    self.engine.abort(out.seq_id)
                if request.done:
                    del self._active[out.seq_id]

    def _drop(self, request: _Request):
        """The caller stopped listening: forget the request; the engine frees it at its next step."""
        self._active.pop(request.seq_id, None)
        self.engine.abort(request.seq_id)

    # -- batch, streaming, async ------------------------------------------------------------------------------

    def __call__(self, prompts, gen_config: GenConfigs = None, do_preprocess: bool = True,
                 use_tqdm: Optional[bool] = None):
        return self.infer(prompts, gen_config, do_preprocess, use_tqdm)

    def infer(self, prompts, gen_config: GenConfigs = None, do_preprocess: bool = True,
              use_tqdm: Optional[bool] = None) -> Union[Response, List[Response]]:
        """Run prompts to the end. One prompt gives one Response, a list gives a list in the same order.
        use_tqdm: a progress bar over the requests (None: for a batch, when stderr is a terminal)."""
        _, is_batch = _as_batch(prompts)
        requests = self._submit_all(prompts, gen_config, do_preprocess, stream=False)
        live = [r for r in requests if isinstance(r, _Request)]
        from tqdm import tqdm
        # tqdm's disable=None: shown only when stderr is a terminal
        disable = True if not is_batch or use_tqdm is False else None if use_tqdm is None else False
        bar = tqdm(total=len(requests), desc='requests', unit='req', disable=disable)
        bar.update(len(requests) - len(live))
        with bar:
            remaining = live
            while remaining:
                self._step()
                still = [r for r in remaining if not r.done]
                bar.update(len(remaining) - len(still))
                remaining = still
        responses = [r.response(self.tokenizer) if isinstance(r, _Request) else r for r in requests]
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

    async def generate(self, prompt, gen_config: Optional[GenerationConfig] = None,
                       do_preprocess: bool = True) -> AsyncIterator[Response]:
        """Stream one prompt's pieces in an asyncio program; many may run at once and share the batch."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request = self._submit(0, prompt, gen_config or self.gen_config, do_preprocess, stream=True)
        if isinstance(request, Response):
            yield request
            return
        request.notify = lambda r: loop.call_soon_threadsafe(queue.put_nowait, r)
        if self._driver is None or self._driver.done():
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
        for seq_id in list(self._active):
            self.engine.abort(seq_id)

    async def _drive(self):
        # until every request has its output and every abort has been carried out
        while self._active or self.engine.has_unfinished():
            await asyncio.to_thread(self._step)

    # -- prompt logits ----------------------------------------------------------------------------------------

    def get_logits(self, input_ids: Union[List[int], List[List[int]]]):
        """float32 logits `[len, vocab]` of every position of each token-id prompt (a list, one per prompt)."""
        batch = [input_ids] if input_ids and isinstance(input_ids[0], int) else input_ids
        with self._lock:
            if not self._active:
                self.engine.step()        # lets go of requests whose callers stopped listening
            if self.engine.has_unfinished():
                raise RuntimeError("get_logits/get_ppl can't run while requests are in flight; call them between "
                                   'generation calls')
            return [self.engine.prompt_logits(ids) for ids in batch]

    def get_ppl(self, input_ids: Union[List[int], List[List[int]]]) -> List[float]:
        """Per prompt, the mean negative log-likelihood of each token after the first, in nats (as lmdeploy
        returns it: exp() of it is the perplexity)."""
        import torch
        batch = [input_ids] if input_ids and isinstance(input_ids[0], int) else input_ids
        out = []
        for ids, logits in zip(batch, self.get_logits(batch)):
            if len(ids) < 2:
                raise ValueError('get_ppl needs prompts of at least two tokens')
            nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
            out.append(nll.item())
        return out

    def close(self):
        """Free the engine (weights and KV cache); the pipeline can't be used afterwards."""
        self.engine = None
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _as_batch(prompts):
    """(list of prompts, whether the caller gave a batch)."""
    if isinstance(prompts, str):
        return [prompts], False
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError('no prompts given')
        if all(isinstance(t, int) for t in prompts) or all(isinstance(m, dict) for m in prompts):
            return [prompts], False
        return list(prompts), True
    raise ValueError(f'prompts must be a string, messages, token ids or a list of them, got {type(prompts).__name__}')


def _per_prompt(gen_config, n: int) -> List[GenerationConfig]:
    if isinstance(gen_config, GenerationConfig):
        return [gen_config] * n
    configs = list(gen_config)
    if len(configs) != n:
        raise ValueError(f'{len(configs)} generation configs for {n} prompts')
    return configs


def _checkpoint_eos_ids(model_path: str) -> List[int]:
    import json
    import os
    path = os.path.join(model_path, 'generation_config.json')
    if not os.path.isfile(path):
        return []
    with open(path, encoding='utf-8') as f:
        eos = json.load(f).get('eos_token_id')
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def pipeline(model_path: str, backend_config: Optional[PytorchEngineConfig] = None,
             log_level: Optional[str] = None, **kwargs) -> Pipeline:
    """Load a checkpoint folder and serve it: `pipeline(path, backend_config=PytorchEngineConfig(...))`."""
    if log_level is not None:
        logging.getLogger('lmdp').setLevel(log_level)
    if kwargs:
        logger.warning('pipeline(): ignoring unsupported arguments %s', sorted(kwargs))
    return Pipeline(model_path, backend_config)
