"""OpenAI's response bodies and stream chunks, built from the engine's Responses.

A choice accumulates its pieces (`Choice.add`) for a whole response, or hands each piece on as a chunk. Log-probs
come from the engine as one {token id: logprob} dict per output token (the top N and the chosen token) and are
written in each endpoint's own shape: completions' parallel lists, chat's list of token entries.
"""
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..messages import Response

TokenText = Callable[[int], str]


def new_id(prefix: str) -> str:
    return f'{prefix}-{uuid.uuid4().hex}'


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
            'total_tokens': prompt_tokens + completion_tokens}


def _top(lp: dict[int, float], n: int) -> list[tuple]:
    return sorted(lp.items(), key=lambda kv: -kv[1])[:n]


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], top_n: int, token_text: TokenText,
                        text_offset: int = 0) -> dict:
    """Completions' shape: tokens, token_logprobs, top_logprobs, text_offset (where each token starts)."""
    out = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
    for token, lp in zip(token_ids, logprobs):
        text = token_text(token)
        out['tokens'].append(text)
        out['token_logprobs'].append(lp.get(token))
        top = {}
        for t, v in _top(lp, top_n):
            top.setdefault(token_text(t), v)     # tokens that read the same (say, partial UTF-8): the likeliest
        out['top_logprobs'].append(top)
        out['text_offset'].append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], top_n: int, token_text: TokenText) -> dict:
    """Chat's shape: per token its text, logprob, UTF-8 bytes and the top_n alternatives."""
    def entry(token, value):
        text = token_text(token)
        return {'token': text, 'logprob': value, 'bytes': list(text.encode('utf-8'))}

    content = []
    for token, lp in zip(token_ids, logprobs):
        item = entry(token, lp.get(token))
        item['top_logprobs'] = [entry(t, v) for t, v in _top(lp, top_n)]
        content.append(item)
    return {'content': content}


@dataclass
class Choice:
    """One prompt's output as its pieces arrive."""
    index: int
    text: str = ''
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    def add(self, piece: Response):
        self.error = piece.error
        self.text += piece.text
        self.token_ids += piece.token_ids
        self.logprobs += piece.logprobs or []
        self.finish_reason = piece.finish_reason
        self.prompt_tokens, self.completion_tokens = piece.input_token_len, piece.generate_token_len


class Formatter:
    """Bodies and chunks of one request: its id, creation time, model name and endpoint."""

    def __init__(self, chat: bool, model: str, token_text: TokenText, top_logprobs: int | None):
        self.chat, self.model, self.token_text, self.top_logprobs = chat, model, token_text, top_logprobs
        self.id = new_id('chatcmpl' if chat else 'cmpl')
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}     # completions' text_offset, per choice, across chunks

    def _logprobs(self, index: int, token_ids, logprobs) -> dict | None:
        if self.top_logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(token_ids, logprobs, self.top_logprobs, self.token_text)
        out = completion_logprobs(token_ids, logprobs, self.top_logprobs, self.token_text, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(t) for t in out['tokens'])
        return out

    def body(self, choices: list[Choice]) -> dict:
        """The whole response of a non-streaming request."""
        items = []
        for c in choices:
            item = {'index': c.index, 'finish_reason': c.finish_reason,
                    'logprobs': self._logprobs(c.index, c.token_ids, c.logprobs)}
            if self.chat:
                item['message'] = {'role': 'assistant', 'content': c.text}
            else:
                item['text'] = c.text
            items.append(item)
        return {'id': self.id, 'object': 'chat.completion' if self.chat else 'text_completion',
                'created': self.created, 'model': self.model, 'choices': items,
                'usage': usage(sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices))}

    def chunk(self, index: int, text: str | None = None, piece: Response | None = None,
              finish_reason: str | None = None, role: bool = False) -> str:
        """One server-sent event carrying a choice's new text (and its tokens' logprobs) or its finish."""
        logprobs = None
        if piece is not None and piece.token_ids and piece.logprobs:
            logprobs = self._logprobs(index, piece.token_ids, piece.logprobs)
        item = {'index': index, 'logprobs': logprobs, 'finish_reason': finish_reason}
        if self.chat:
            delta = {'role': 'assistant'} if role else {}
            if text is not None:
                delta['content'] = text
            item['delta'] = delta
        else:
            item['text'] = text or ''
        return self._event([item])

    def usage_chunk(self, choices: list[Choice]) -> str:
        return self._event([], usage(sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices)))

    def _event(self, items: list, usage_: dict | None = None) -> str:
        body = {'id': self.id, 'object': 'chat.completion.chunk' if self.chat else 'text_completion',
                'created': self.created, 'model': self.model, 'choices': items}
        if usage_ is not None:
            body['usage'] = usage_
        return sse(body)


def sse(body) -> str:
    return f'data: {json.dumps(body, ensure_ascii=False)}\n\n'


DONE = 'data: [DONE]\n\n'
