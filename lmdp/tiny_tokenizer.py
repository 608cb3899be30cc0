"""Offline tiny tokenizer for test checkpoints.

A byte-level BPE (~512 tokens) trained in-process on a small built-in English
corpus, so tests never need the model hub. Byte-level means every string,
unicode included, encodes and decodes back exactly.
"""

from __future__ import annotations

import functools
from pathlib import Path

VOCAB_SIZE = 512

# Fixed order => fixed ids (tests and configs rely on them).
PAD, BOS, EOS, UNK = '<pad>', '<s>', '</s>', '<unk>'
START_HEADER, END_HEADER, EOT = '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, START_HEADER, END_HEADER, EOT)
SPECIAL_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

# Llama-3-like: <s><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>...
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Small, fixed training corpus. Content is irrelevant; it only needs enough
# distinct words for the BPE to fill the vocab deterministically.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model reads a short story
and writes the next word, one token at a time, until it reaches the end.
Once upon a time there was a little village by the river. Every morning the
baker opened his shop, the children walked to school, and the old fisherman
pushed his boat into the water. In the evening they all gathered in the square
to talk about the weather, the harvest, and the strange lights in the sky.
The user asks a question and the assistant gives an answer. The system sets the
rules of the conversation. Please explain how attention works in a transformer:
each position looks at earlier positions, weighs them, and mixes their values.
Keys and values are stored in a cache made of fixed-size pages, so that many
requests can share memory without copying. When a sequence grows, a new page is
allocated; when it finishes, its pages are returned to the free list.
Numbers such as 0, 1, 2, 3, 42, 100, 2024 and 3.14159 appear in text too.
Some people write code: def main(): print("hello, world") return 0.
What is your name? Where do you live? Why is the sky blue? How are you today?
I think therefore I am. To be or not to be, that is the question. Knowledge is
power, and time is money; but kindness costs nothing and is worth everything.
"""


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """Train the byte-level BPE once per process; return its tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))  # byte-level never needs <unk>
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Like Llama: prepend <s> when add_special_tokens=True. trim_offsets off
    # so offsets stay plain byte-level ones.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f'{BOS} $A', pair=f'{BOS} $A {BOS} $B', special_tokens=[(BOS, SPECIAL_IDS[BOS])]
        ),
    ])
    return tok.to_str()


def build_tokenizer():
    """Return a `transformers.PreTrainedTokenizerFast` around the tiny BPE."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # would break exact round trips
        model_max_length=1024,  # = make_tiny's default max_position_embeddings
    )


def save_tokenizer(out_dir: str | Path):
    """Write tokenizer.json + tokenizer_config.json (with chat template) to out_dir."""
    tok = build_tokenizer()
    # transformers 5 defaults to a separate chat_template.jinja; keep the
    # template inside tokenizer_config.json like most hub checkpoints do.
    tok.save_pretrained(str(out_dir), save_jinja_files=False)
    return tok
