"""The checkpoint's own tokenizer and chat template (transformers' AutoTokenizer), and text that streams.

Incremental detokenisation decodes a short window of tokens at a time, as vLLM and transformers' TextStreamer do:
text is released only once it no longer ends in an unfinished UTF-8 character, and the last piece is the
difference between the whole output decoded at once and what was released, so the pieces always join up to the
final text. Stop words are matched in the text; text that could be the start of a stop word is held back until
it is known not to be one.
"""
from collections.abc import Sequence

Messages = list[dict[str, str]]


class Tokenizer:
    """Encode prompts (plain text or chat messages through the chat template) and decode outputs."""

    def __init__(self, model_path: str, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        from .errors import TokenizerError
        try:
            self.model = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        except Exception as e:          # transformers raises OSError, ValueError, KeyError... by the problem
            raise TokenizerError(f'could not load the tokenizer of {model_path!r} ({type(e).__name__}: {e}). The '
                                 "folder needs the checkpoint's tokenizer files (tokenizer.json, "
                                 'tokenizer_config.json)') from e
        if self.model is None or not callable(getattr(self.model, 'encode', None)):
            raise TokenizerError(f'the tokenizer of {model_path!r} loaded as {type(self.model).__name__}, which '
                                 "can't encode text; the folder needs tokenizer.json and tokenizer_config.json")

    @property
    def eos_token_id(self) -> int | None:
        return self.model.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.model, 'chat_template', None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.model.encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: Messages) -> list[int]:
        """Token ids of a conversation rendered by the checkpoint's chat template, ready for the reply."""
        if not self.has_chat_template:
            raise ValueError('this tokenizer has no chat template; pass plain text or token ids instead of chat '
                             'messages')
        text = self.model.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template writes the bos token itself, so the encoder must not add another
        return self.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.model.decode(token_ids, skip_special_tokens=skip_special_tokens)


class TextStream:
    """The text of one output as its tokens arrive: `push` returns the new piece of text, `finish` the rest."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 stop_words: list[str] | None = None, include_stop_str: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_words = stop_words or []
        self.include_stop_str = include_stop_str
        self.token_ids: list[int] = []
        self.text = ''            # decoded so far (before any stop-word cut)
        self.released = 0         # characters of `text` handed out
        self.stopped = False
        self._prefix = 0          # token window: [prefix, read) decoded already, read onwards new
        self._read = 0

    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Add tokens; returns (new text safe to show, whether a stop word has now appeared)."""
        self.token_ids.extend(token_ids)
        window = self.token_ids[self._prefix:]
        before = self._decode(self.token_ids[self._prefix:self._read])
        now = self._decode(window)
        if len(now) > len(before) and not now.endswith('\ufffd'):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.token_ids)
        if self.stop_words and self._cut_at_stop_word():
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held_back()), False

    def finish(self) -> str:
        """The remaining text once the output is complete."""
        if not self.stopped:
            whole = self._decode(self.token_ids)
            if whole.startswith(self.text[:self.released]):
                self.text = whole
        return self._release(len(self.text))

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens) if ids else ''

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        piece, self.released = self.text[self.released:end], end
        return piece

    def _cut_at_stop_word(self) -> bool:
        longest = max(len(w) for w in self.stop_words)
        start = max(0, self.released - longest)
        hits = [(self.text.find(w, start), w) for w in self.stop_words]
        hits = [(i, w) for i, w in hits if i >= 0]
        if not hits:
            return False
        i, word = min(hits)
        self.text = self.text[:i + len(word) if self.include_stop_str else i]
        self.stopped = True
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that a stop word starts with."""
        held = 0
        for word in self.stop_words:
            for n in range(min(len(word) - 1, len(self.text)), held, -1):
                if self.text.endswith(word[:n]):
                    held = n
                    break
        return held
