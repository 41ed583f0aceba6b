"""Deadlines (server/domain/deadlines.py): the heap behind the token expiry pass."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testpulse.domain.deadlines import Deadlines

pytestmark = pytest.mark.unit


def test_due_keys_come_out_earliest_first_and_only_once() -> None:
    d: Deadlines[str] = Deadlines()
    d.set("b", 2.0)
    d.set("a", 1.0)
    d.set("c", 3.0)
    assert d.pop_due(0.5) == []
    assert d.pop_due(2.0) == ["a", "b"]
    assert d.pop_due(2.0) == []
    assert list(d.pop_due(10.0)) == ["c"]
    assert len(d) == 0


def test_setting_a_key_again_replaces_its_deadline_later_or_earlier() -> None:
    d: Deadlines[str] = Deadlines()
    d.set("token", 5.0)
    d.set("token", 9.0)  # refreshed: the old deadline must not fire
    assert d.pop_due(6.0) == []
    d.set("token", 7.0)
    assert d.pop_due(8.0) == ["token"]
    assert d.pop_due(100.0) == []


def test_a_forgotten_key_never_comes_due() -> None:
    d: Deadlines[str] = Deadlines()
    d.set("gone", 1.0)
    d.set("stays", 1.0)
    d.forget("gone")
    d.forget("never-set")
    assert "gone" not in d
    assert d.pop_due(2.0) == ["stays"]


def test_keys_that_come_and_go_do_not_grow_the_heap() -> None:
    d: Deadlines[int] = Deadlines()
    for key in range(100_000):  # clients that connect and leave, each with a day-long token
        d.set(key, 86_400.0 + key)
        d.forget(key)
    d.set(-1, 1.0)
    assert len(d) == 1
    assert len(d._heap) <= 2 * len(d) + 64


@given(st.lists(st.tuples(st.sampled_from(["set", "forget", "pop"]), st.integers(0, 9), st.integers(0, 50))))
def test_pops_match_a_plain_dict_model(ops: list[tuple[str, int, int]]) -> None:
    d: Deadlines[int] = Deadlines()
    model: dict[int, int] = {}
    for op, key, t in ops:
        if op == "set":
            d.set(key, float(t))
            model[key] = t
        elif op == "forget":
            d.forget(key)
            model.pop(key, None)
        else:
            due = sorted((when, k) for k, when in model.items() if when <= t)
            assert d.pop_due(float(t)) == [k for _, k in due]
            for _, k in due:
                del model[k]
        assert len(d) == len(model)
