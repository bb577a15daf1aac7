from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.serving.text import IncrementalDecoder, StopMatcher
from tests.factories import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("text", ["émigré café naïve", "東京 😀 ✓ done", "plain ascii, numbers 0123", "😀😀😀"])
def test_incremental_decoder_rebuilds_text_and_never_emits_partial_characters(tokenizer, text):
    ids = tokenizer(text).input_ids
    # Byte-level BPE splits multi-byte characters across tokens in this tiny vocabulary.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids) or text.isascii()
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push([i]) for i in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_incremental_decoder_keeps_word_spaces_after_prompt(tokenizer):
    prompt = tokenizer("Hello").input_ids
    ids = tokenizer(" world and more").input_ids
    decoder = IncrementalDecoder(tokenizer, prompt)
    assert "".join(decoder.push([i]) for i in ids) + decoder.flush() == " world and more"


def test_stop_matcher_finds_stop_spanning_deltas():
    m = StopMatcher(["###"])
    assert m.feed("abc#") == ("abc", False)  # '#' held back: could start the stop
    assert m.feed("#") == ("", False)
    assert m.feed("#tail") == ("", True)


def test_stop_matcher_releases_held_text_that_is_not_a_stop():
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("AR") == ("STAR", False)
    assert m.flush() == ""


def test_stop_matcher_earliest_of_several_stops_wins():
    m = StopMatcher(["cd", "b"])
    assert m.feed("abcd") == ("a", True)


def test_stop_matcher_stops_at_the_stop_that_completes_first_however_the_text_arrives():
    # "a" completes at "#a", before "#aa" (which starts earlier) can: found by hypothesis.
    assert StopMatcher(["a", "#aa"]).feed("#aa") == ("#", True)
    m = StopMatcher(["a", "#aa"])
    assert m.feed("#a") == ("#", True)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab#\n ", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    stops=st.lists(st.text(alphabet="ab#\n", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_matcher_equals_truncating_the_whole_text(text, cuts, stops):
    """However the text is split into deltas, the emitted text is the text up to the stop that
    completes first (as generation meets them token by token; ties: the earlier start)."""
    positions = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *positions], [*positions, len(text)], strict=True)]
    m = StopMatcher(stops)
    out, stopped = "", False
    for piece in pieces:
        emitted, stopped = m.feed(piece)
        out += emitted
        if stopped:
            break
    if not stopped:
        out += m.flush()
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    expected = text[: min(hits)[1]] if hits else text
    assert out == expected
    assert stopped == bool(hits)
