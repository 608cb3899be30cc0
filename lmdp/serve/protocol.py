"""The OpenAI HTTP API's request bodies, checked on arrival, and what they mean to the engine.

Field names, defaults and ranges are OpenAI's (completions: `max_tokens` 16; chat: the rest of the session), with
vLLM's extensions beside them (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, ...). Fields this server doesn't know are ignored with a warning, as vLLM does; features it knows
but can't honour (n > 1, penalties, tools, ...) are refused with a message, never silently dropped.
"""
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..messages import GenerationConfig

logger = logging.getLogger('lmdp.serve')

MAX_LOGPROBS = 20


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = 'invalid_request_error', param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {'error': {'message': self.message, 'type': self.type, 'param': self.param, 'code': self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """What completions and chat share."""
    model_config = ConfigDict(extra='allow')

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)        # -1 or 0: no limit
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def refuse_unsupported(self):
        """APIError(400) for a setting this server can't honour."""
        if self.n != 1:
            _refuse('n', f'n={self.n}: this server returns one choice per prompt; send n=1 or leave it out')
        for name in ('presence_penalty', 'frequency_penalty'):
            if getattr(self, name):
                _refuse(name, f'{name} is not supported; leave it at 0 (repetition_penalty is)')
        if self.logit_bias:
            _refuse('logit_bias', 'logit_bias is not supported; leave it out')
        if isinstance(self.stop, list) and not all(self.stop):
            _refuse('stop', 'stop strings must not be empty')
        unknown = sorted(self.model_extra or ())
        if unknown:
            logger.warning('ignoring unknown request fields %s', unknown)

    def generation_config(self, max_new_tokens: int, logprobs: int | None,
                          defaults: dict[str, Any]) -> GenerationConfig:
        """The engine's settings: the request's values, then the checkpoint's sampling defaults, then OpenAI's."""
        def pick(name, openai_default):
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, openai_default)

        temperature = pick('temperature', 1.0)
        top_k = pick('top_k', 0)
        return GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=self.min_tokens, do_sample=temperature > 0,
            temperature=temperature, top_p=pick('top_p', 1.0), top_k=max(top_k, 0), min_p=pick('min_p', 0.0),
            repetition_penalty=pick('repetition_penalty', 1.0), ignore_eos=self.ignore_eos, random_seed=self.seed,
            stop_words=[self.stop] if isinstance(self.stop, str) else self.stop or None,
            stop_token_ids=self.stop_token_ids, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator('prompt', mode='wrap')
    @classmethod
    def _one_of_the_prompt_shapes(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise ValueError('must be a string, a list of strings, a list of token ids or a list of lists of token '
                             'ids') from None

    def refuse_unsupported(self):
        super().refuse_unsupported()
        if self.echo:
            _refuse('echo', 'echo is not supported; leave it out and prepend the prompt yourself')
        if self.suffix:
            _refuse('suffix', 'suffix (insertion) is not supported; leave it out')
        if self.best_of not in (None, 1):
            _refuse('best_of', f'best_of={self.best_of}: only 1 is supported')

    def prompts(self) -> list:
        """One engine prompt per choice: a string, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]
        if not p:
            _refuse('prompt', 'the prompt is empty; give text or token ids')
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra='allow')

    role: str
    content: str | list[dict[str, Any]] | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):         # content parts: text only
            texts = []
            for part in content:
                if part.get('type') != 'text' or not isinstance(part.get('text'), str):
                    _refuse('messages', f"this server takes text only; got a content part of type "
                            f"{part.get('type')!r}")
                texts.append(part['text'])
            content = ''.join(texts)
        return {'role': self.role, 'content': content or ''}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self):
        super().refuse_unsupported()
        if self.tools or self.functions:
            _refuse('tools', 'tool calling is not supported; leave tools out')
        if self.response_format and self.response_format.get('type') not in (None, 'text'):
            _refuse('response_format', f"response_format {self.response_format.get('type')!r} is not supported; "
                    "only 'text' is")
        if self.top_logprobs and not self.logprobs:
            _refuse('top_logprobs', 'top_logprobs needs logprobs=true')

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _refuse(param: str, message: str):
    raise APIError(400, message, param=param)


def validation_message(errors) -> str:
    """One line per problem pydantic found, each naming its field the way the request spelled it."""
    lines = []
    for e in errors:
        loc = [str(p) for p in e.get('loc', ()) if p != 'body']
        where = '.'.join(loc) or 'body'
        msg = e.get('msg', 'invalid').removeprefix('Value error, ')
        lines.append(f'{where}: {msg}')
    return '; '.join(lines)
