"""StreamDecoder: multi-byte characters and stop strings never leak half-done."""

from hypothesis import given
from hypothesis import strategies as st

from covey.miner.backends.text import DeltaBuffer
from covey.protocol.text import StreamDecoder


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


@given(
    st.text(min_size=0, max_size=30),
    st.text(min_size=1, max_size=5),
    st.text(min_size=0, max_size=30),
    st.lists(st.integers(min_value=0, max_value=1000), max_size=20),
)
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


def test_delta_buffer_sends_first_token_at_once_then_batches():
    now = [0.0]
    frames: list[tuple[str, tuple[int, ...]]] = []
    buf = DeltaBuffer(0.02, lambda text, ids: frames.append((text, ids)), clock=lambda: now[0])
    buf.add("Hel", 1)
    assert frames == [("Hel", (1,))]
    for i, piece in enumerate(["lo", ",", " wor"], start=2):
        now[0] += 0.005
        buf.add(piece, i)
    assert frames == [("Hel", (1,))]  # 15 ms since the last frame: still held
    now[0] += 0.006
    buf.add("ld", 5)
    assert frames[-1] == ("lo, world", (2, 3, 4, 5))
    buf.add("", None)
    buf.flush()
    assert len(frames) == 2  # nothing queued, nothing sent
    buf.add("", 6)  # a token whose bytes are held back still reports its id
    buf.flush()
    assert frames[-1] == ("", (6,))


def test_delta_buffer_with_zero_interval_sends_every_token():
    frames: list[str] = []
    buf = DeltaBuffer(0.0, lambda text, ids: frames.append(text))
    for piece in "abc":
        buf.add(piece, 0)
    assert frames == ["a", "b", "c"]


@given(st.text(alphabet="ab🙂é ", max_size=30), st.lists(st.integers(0, 10_000), max_size=30),
       st.integers(0, 40), st.sampled_from([(), ("b🙂",), ("aa", "é b")]))
def test_a_resumed_decoder_sends_exactly_the_rest(text: str, cuts: list[int], cut: int,
                                                  stop: tuple[str, ...]):
    """Failover: a second decoder replays the first run's tokens and must emit exactly what
    the first had not yet sent, wherever the first run was cut."""
    pieces = _split(text.encode(), cuts)
    cut = min(cut, len(pieces))
    whole = StreamDecoder(stop)
    full = "".join(whole.feed(p) for p in pieces) + whole.finish()

    first = StreamDecoder(stop)
    sent = "".join(first.feed(p) for p in pieces[:cut])
    if cut == len(pieces):
        sent += first.finish()  # the first run ended, but its done frame was lost
    second = StreamDecoder(stop)
    second.replay(pieces[:cut], len(sent))
    rest = "".join(second.feed(p) for p in pieces[cut:]) + second.finish()
    assert sent + rest == full
