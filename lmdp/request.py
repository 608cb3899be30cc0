"""One request's progress inside the pipeline: its tokens as the engine draws them, its text, its finish, and
the pieces a streaming caller has not taken yet."""
import collections
import logging
from collections.abc import Callable

from .engine.engine import EngineOutput
from .messages import GenerationConfig, Response
from .tokenizer import TextStream, Tokenizer

logger = logging.getLogger('lmdp')


class Request:
    """One prompt's progress: its tokens as they come, its text, its finish."""

    def __init__(self, seq_id: int, index: int, input_len: int, gen_config: GenerationConfig, stop_ids,
                 stream: bool, text: TextStream | None):
        self.seq_id, self.index, self.input_len, self.gen_config = seq_id, index, input_len, gen_config
        self.stop_ids, self.stream, self.text = stop_ids, stream, text
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if gen_config.logprobs else None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.queued = False               # the engine has been handed it
        self.pending: collections.deque[Response] = collections.deque()    # streamed pieces not yet handed out
        self.notify: Callable[[Response], None] | None = None

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
            self.error = out.error
            if self.text is not None:
                piece += self.text.finish()
        if self.stream:
            lps = self.logprobs[-len(new_ids):] if self.logprobs is not None and new_ids else None
            self._emit(Response(piece, len(self.token_ids), self.input_len, self.finish_reason, new_ids, lps,
                                self.index, self.error))
        return hit

    def fail(self, error: str):
        """Finish with an error that did not come from the engine (the last Response says it)."""
        if self.done:
            return
        self.finish_reason, self.error = 'error', error
        if self.stream:
            self._emit(Response('', len(self.token_ids), self.input_len, 'error', [], None, self.index, error))

    def _emit(self, response: Response):
        if self.notify is not None:
            try:
                self.notify(response)
            except RuntimeError:          # the caller's event loop is closed: nobody is left to tell
                logger.debug('request %d: its event loop is gone', self.index)
        else:
            self.pending.append(response)

    def response(self, tokenizer: Tokenizer) -> Response:
        text = self.text.text if self.text is not None else \
            tokenizer.decode(self.token_ids, self.gen_config.skip_special_tokens)
        return Response(text, len(self.token_ids), self.input_len, self.finish_reason, list(self.token_ids),
                        self.logprobs, self.index, self.error)


def error_response(index: int, message: str) -> Response:
    return Response('', 0, 0, 'error', index=index, error=message)
