"""StreamDecoder: multi-byte characters and stop strings never leak half-done."""

from hypothesis import given
from hypothesis import strategies as st

from covey.miner.backends.text import StreamDecoder


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@given(st.text(), st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_byte_split_reassembles_without_replacement_chars(text: str, cuts: list[int]):
    dec = StreamDecoder()
    out = [dec.feed(p) for p in _split(text.encode(), cuts)]
    out.append(dec.finish())
    assert "".join(out) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in piece for piece in out)


def test_emoji_split_bytewise_is_held_back_until_whole():
    dec = StreamDecoder()
    emitted = [dec.feed(bytes([b])) for b in "🙂".encode()]
    assert emitted == ["", "", "", "🙂"]


@given(st.text(min_size=0, max_size=30), st.text(min_size=1, max_size=5),
       st.text(min_size=0, max_size=30),
       st.lists(st.integers(min_value=0, max_value=1000), max_size=20))
def test_stop_string_cuts_output_before_it(head: str, stop: str, tail: str, cuts: list[int]):
    full = head + stop + tail
    expected = full[: full.find(stop)]
    dec = StreamDecoder([stop])
    out = "".join(dec.feed(p) for p in _split(full.encode(), cuts)) + dec.finish()
    assert out == expected
    assert dec.stopped


def test_possible_stop_prefix_is_held_then_released():
    dec = StreamDecoder(["\nUser:"])
    assert dec.feed(b"Hi\nUs") == "Hi"
    assert dec.feed(b"ually") == "\nUsually"
    assert not dec.stopped


def test_truncated_character_at_end_is_dropped_not_replaced():
    dec = StreamDecoder()
    assert dec.feed("a€".encode()[:2]) == "a"
    assert dec.finish() == ""
