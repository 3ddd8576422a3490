"""``Ok`` and ``Error`` (``_result.py``): immutable values, compared by value, matched by
position, subscriptable as generics -- as the dataclasses they replaced (start-up)."""

from __future__ import annotations

import pytest

import memprof_limits as ml


def test_results_are_immutable_and_compare_by_value() -> None:
    ok = ml.Ok(1)
    with pytest.raises(AttributeError, match="immutable"):
        ok.value = 2  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del ok.value
    exc = ValueError()
    assert ml.Ok(1) == ml.Ok(1) and ml.Ok(1) != ml.Ok(2) and ml.Error(exc) == ml.Error(exc)
    assert ml.Ok(1) != ml.Error(exc) and ml.Ok(1) != (1,)
    assert hash(ml.Ok(1)) == hash(ml.Ok(1)) and {ml.Ok(1), ml.Ok(1)} == {ml.Ok(1)}
    nan = float("nan")
    assert ml.Ok(nan) == ml.Ok(nan)  # the same object, as a tuple compares it
    assert repr(ml.Ok([1])) == "Ok(value=[1])" and repr(ml.Error(exc)) == "Error(exc=ValueError())"
    assert ml.Ok[int] is not None and not hasattr(ml.Ok(1), "__dict__")


def test_results_match_by_position() -> None:
    def describe(result: ml.Ok[int] | ml.Error) -> str:
        match result:
            case ml.Ok(value):
                return f"ok {value}"
            case ml.Error(exc):
                return f"error {type(exc).__name__}"
        return "neither"

    assert describe(ml.Ok(3)) == "ok 3" and describe(ml.Error(KeyError())) == "error KeyError"


def test_results_pickle_and_copy() -> None:
    """As the frozen dataclasses did (a slot restored by setattr would be refused)."""
    import copy
    import pickle

    for result in (ml.Ok([1, 2]), ml.Error(ValueError("x"))):
        for again in (pickle.loads(pickle.dumps(result)), copy.copy(result), copy.deepcopy(result)):
            assert type(again) is type(result) and repr(again) == repr(result)
    assert pickle.loads(pickle.dumps(ml.Ok(3))) == ml.Ok(3)
