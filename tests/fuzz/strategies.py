"""Strategies shared by the fuzz targets: weighted choice, unicode edge cases, hostile tag values."""

from __future__ import annotations

from hypothesis import strategies as st

UNICODE_EDGES = [
    "",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "x\udc80y",
    "\ud83d\ude00",
    "😀",
    "\u202e",
    "\u202eevil\u202c",
    "\u200f",
    "\u200b",
    "e\u0301",
    "\u0301" * 40,
    "Z\u0336\u0334\u0337" * 8,
    "\ufeff",
    "\u2028",
    "\u2029",
    "\x7f",
    "\x1f",
    "\x0b",
    "\x85",
    "\uffff",
    "\ufffe",
    "\U0010ffff",
    '"',
    "\\",
    "/",
    '"\\/',
    "\n\r\t\b\f",
    "日本語",
    "ﷺ",
    "\u0000end",
    "\\u0000",
    "\\ud800",
    "null",
    "[]",
    "{}",
]


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, with these relative weights (``st.one_of`` picks uniformly)."""
    total = sum(weight for weight, _ in choices)

    @st.composite
    def pick(draw):
        n = draw(st.integers(0, total - 1))
        for weight, strategy in choices:
            if n < weight:
                return draw(strategy)
            n -= weight
        raise AssertionError(n)

    return pick()


def choose(draw, *choices: tuple[int, st.SearchStrategy]):
    """Inside a composite: draw from one of the strategies, with these relative weights.

    (Cheaper than ``draw(weighted(...))``, which builds a new strategy at every draw.)
    """
    n = draw(st.integers(0, sum(weight for weight, _ in choices) - 1))
    for weight, strategy in choices:
        if n < weight:
            return draw(strategy)
        n -= weight
    raise AssertionError(n)


edge_char = st.one_of(
    st.characters(),
    st.sampled_from(["\ud800", "\udbff", "\udc00", "\x00", "\u202e", "\u0301"]),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
)
short_text = st.one_of(
    st.text(max_size=30),
    st.text(edge_char, max_size=12),
    st.sampled_from(UNICODE_EDGES),
    st.lists(st.sampled_from(UNICODE_EDGES), min_size=2, max_size=6).map("".join),
)
# overlong: around the 64 KiB content and event limits
overlong_text = st.builds(
    lambda c, n: c * n,
    st.sampled_from(["a", "é", "😀", "\x00", "\u0301", '"']),
    st.sampled_from([1000, 21_845, 32_768, 65_530, 65_536, 65_537, 70_000]),
)
edge_text = weighted((30, short_text), (1, overlong_text))
