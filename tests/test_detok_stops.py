"""Stop strings before and after min_tokens: a stop string matches when it ends in text pushed
armed (it may begin earlier), and the output is the text before the earliest such match."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokenwire.server.tokenizer import StopMatcher

pytestmark = pytest.mark.compute

STOPS = st.lists(st.text("ab", min_size=1, max_size=3), min_size=1, max_size=3, unique=True)
PIECES = st.lists(st.text("abc", max_size=3), min_size=1, max_size=5)


def _streamed(stops: tuple[str, ...], pieces: list[str], armed_from: int) -> tuple[str, str | None]:
    """What a StopMatcher lets out of `pieces` (armed from piece `armed_from` on), and whether
    and where it stopped."""
    matcher, out = StopMatcher(stops), ""
    for i, piece in enumerate(pieces):
        text, stop = matcher.push(piece, armed=i >= armed_from)
        out += text
        if stop is not None:
            return out, stop
    return out + matcher.flush(), None


def _expected(stops: tuple[str, ...], pieces: list[str], armed_from: int) -> tuple[str, str | None]:
    """The rule, on the whole text: at the first armed piece in which some stop string ends,
    the output is the text before the earliest-beginning stop string that ends in that piece."""
    text = ""
    for i, piece in enumerate(pieces):
        before, text = len(text), text + piece
        if i < armed_from:
            continue
        ending_here = [
            (at, stop)
            for stop in stops
            for at in range(len(text) - len(stop) + 1)
            if text.startswith(stop, at) and at + len(stop) > before
        ]
        if ending_here:
            at = min(at for at, _ in ending_here)
            return text[:at], next(stop for start, stop in ending_here if start == at)
    return text, None


def test_a_stop_string_ending_before_min_tokens_does_not_hide_a_longer_one() -> None:
    """stop=["he", "hel"], min_tokens=1, tokens "he|l|lo| wor|ld": "he" ends unarmed and goes
    uncounted, but "hel", which begins with it and ends armed, stops the stream at once, as it
    does when it is the only stop string."""
    pieces = ["he", "l", "lo", " wor", "ld"]
    assert _streamed(("he", "hel"), pieces, 1) == ("", "hel")
    assert _streamed(("hel",), pieces, 1) == ("", "hel")


@settings(max_examples=3000, deadline=None, database=None)
@given(stops=STOPS, pieces=PIECES, armed_from=st.integers(0, 6))
@example(stops=["ab", "abc"], pieces=["ab", "c"], armed_from=1)
@example(stops=["b", "abc"], pieces=["ab", "c"], armed_from=1)
def test_streamed_stops_follow_the_rule_on_the_whole_text(
    stops: list[str], pieces: list[str], armed_from: int
) -> None:
    """For any stop strings and pieces, armed from any piece on, the streamed output and the
    stop string found agree with the rule applied to the whole text (see _expected; of stop
    strings that begin at the same place, the first listed), wherever they overlap or nest."""
    assert _streamed(tuple(stops), pieces, armed_from) == _expected(
        tuple(stops), pieces, armed_from
    )
