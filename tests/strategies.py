"""Hypothesis strategies the property tests share."""
from hypothesis import strategies as st


@st.composite
def grids(draw):
    p = draw(st.integers(1, 3))
    pattern = draw(st.sampled_from(["token", "group"]))
    need = p if pattern == "token" else p * (p - 1) + 1
    t = draw(st.integers(1, 3))
    h = draw(st.integers(need, 13))
    w = draw(st.integers(need, 13))
    return (t, h, w), p, pattern
