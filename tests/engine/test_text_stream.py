"""Incremental detokenisation and stop words on the text."""
import pytest

from lmdp.tokenizer import TextStream, Tokenizer


@pytest.fixture(scope='module')
def tok(tiny2):
    return Tokenizer(tiny2)


def test_pieces_join_to_the_whole_decode_even_inside_a_character(tok):
    ids = tok.encode('naïve café 😀 done', add_special_tokens=False)
    stream = TextStream(tok)
    pieces = [stream.push([i])[0] for i in ids] + [stream.finish()]
    assert ''.join(pieces) == tok.decode(ids) == 'naïve café 😀 done'
    assert not any('\ufffd' in p for p in pieces)             # a half character is never shown


def test_stop_word_cuts_and_holds_back_a_possible_start(tok):
    ids = tok.encode('the quick brown fox jumps', add_special_tokens=False)
    stream = TextStream(tok, stop_words=['brown f'])
    shown, hit = '', False
    for i in ids:
        piece, hit = stream.push([i])
        shown += piece
        assert 'brown'[:3] not in shown or hit               # 'bro...' is held until it is known
        if hit:
            break
    shown += stream.finish()
    assert hit and shown == 'the quick '
    kept = TextStream(tok, stop_words=['brown f'], include_stop_str=True)
    for i in ids:
        if kept.push([i])[1]:
            break
    assert kept.text == 'the quick brown f'


def test_held_back_text_is_released_when_it_is_not_a_stop_word(tok):
    stream = TextStream(tok, stop_words=['quick brown'])
    ids = tok.encode('a quick fox', add_special_tokens=False)
    text = ''.join(stream.push([i])[0] for i in ids) + stream.finish()
    assert text == 'a quick fox' and not stream.stopped
