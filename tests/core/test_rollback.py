"""Rollback guards (DESIGN §6, issue 4): a ``Guarded`` value's modifications inside a
transaction are rolled back to the checkpoint if the task is interrupted, and committed
otherwise. Shallow by default (a mapping's bindings, a list's or set's elements, the binding of
``.value``); deeper state through ``snapshot=``/``restore=`` or ``__snapshot__``/``__restore__``.
"""

from __future__ import annotations

import copy
import gc
import threading
import time
from typing import Any

import pytest

import memprof_limits as ml
from memprof_limits import _rollback

BUDGET = 1_000_000


def allocate_forever() -> None:
    keep = []
    while True:
        keep.append(str(len(keep)) * 10)


def touch() -> None:
    """A Python call: a delivery point."""


def interrupted(task: Any) -> ml.Ok[Any] | ml.Error:
    """Run ``task`` under an allocation budget that it runs past."""

    def run() -> None:
        task()
        allocate_forever()

    result = ml.limit_allocations(run, limit=BUDGET)
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.AllocationLimitExceeded)
    return result


# -- mappings: shallow, O(names) --------------------------------------------------------------


def test_mapping_bindings_are_rolled_back_when_interrupted() -> None:
    kept = [1, 2, 3]
    namespace = {"x": 1, "gone": "soon", "kept": kept}
    guarded = ml.Guarded(namespace, name="namespace", track=False)
    transaction = guarded.transaction()

    def task() -> None:
        with transaction as g:
            assert g is guarded
            g.value["x"] = 2
            g.value["new"] = "added"
            del g.value["gone"]
            allocate_forever()

    interrupted(task)
    assert guarded.value is namespace
    assert namespace == {"x": 1, "gone": "soon", "kept": [1, 2, 3]}
    assert namespace["kept"] is kept
    report = transaction.report
    assert report is not None and bool(report)
    assert (report.added, report.changed, report.removed) == (("new",), ("x",), ("gone",))
    assert report.describe() == "rolled back: new (added), x (changed), gone (deleted)"


def test_mapping_rollback_is_shallow() -> None:
    """The bindings are restored, not the objects they point to: an in-place change to a
    value survives (use snapshot=/restore= for deeper state)."""
    inner = [1]
    guarded = ml.Guarded({"inner": inner, "n": 0}, track=False)

    def task() -> None:
        with guarded.transaction():
            guarded.value["inner"].append(2)  # in place: not undone
            guarded.value["n"] = 1  # a binding: undone
            allocate_forever()

    interrupted(task)
    assert guarded.value == {"inner": [1, 2], "n": 0}
    assert guarded.value["inner"] is inner


def test_mapping_checkpoint_copies_bindings_not_values() -> None:
    big = list(range(10_000))
    guarded = ml.Guarded({"big": big}, track=False)
    checkpoint = guarded.checkpoint()
    assert checkpoint.contents["big"] is big  # O(number of names), not O(size of the values)


def test_excluded_names_are_left_alone() -> None:
    guarded = ml.Guarded(
        {"keep_me": 0, "_private": 0}, exclude=lambda k: k.startswith("_"), track=False
    )

    def task() -> None:
        with guarded.transaction():
            guarded.value["keep_me"] = 1
            guarded.value["_private"] = 1
            guarded.value["_new"] = 1
            allocate_forever()

    interrupted(task)
    assert guarded.value == {"keep_me": 0, "_private": 1, "_new": 1}


# -- commit ------------------------------------------------------------------------------------


def test_commit_when_the_task_is_not_interrupted() -> None:
    guarded = ml.Guarded({"x": 1}, track=False)
    transaction = guarded.transaction()

    def task() -> str:
        with transaction:
            guarded.value["x"] = 2
            guarded.value["y"] = 3
        return "done"

    assert ml.limit_allocations(task, limit="100 MB").value[0] == "done"  # type: ignore[union-attr]
    assert guarded.value == {"x": 2, "y": 3}
    assert transaction.report is None


def test_an_ordinary_exception_commits() -> None:
    """Only interrupts roll back: a bug in the task leaves its changes, as without a guard."""
    guarded = ml.Guarded({"x": 1}, track=False)
    with pytest.raises(ZeroDivisionError), guarded.transaction():
        guarded.value["x"] = 2
        _ = 1 // 0
    assert guarded.value == {"x": 2}


def test_a_keyboard_interrupt_rolls_back() -> None:
    """Ctrl+C in a program without sigint_sets: asynchronous like an interrupt, it can land
    half-way through the block -- which then must not be committed."""
    guarded = ml.Guarded({"x": 1}, track=False)
    with pytest.raises(KeyboardInterrupt), guarded.transaction() as transaction_value:
        guarded.value["x"] = 2
        raise KeyboardInterrupt
    assert transaction_value is guarded
    assert guarded.value == {"x": 1}


def test_a_swallowed_interrupt_still_rolls_back() -> None:
    guarded = ml.Guarded({"x": 1}, track=False)

    def task() -> str:
        with guarded.transaction():
            guarded.value["x"] = 2
            try:
                allocate_forever()
            except ml.Interrupted:
                pass
        return "pretending all is fine"

    result = ml.limit_allocations(task, limit=BUDGET)
    assert isinstance(result, ml.Error)
    assert guarded.value == {"x": 1}


def test_an_interrupt_raised_by_hand_rolls_back() -> None:
    guarded = ml.Guarded({"x": 1}, track=False)
    with pytest.raises(ml.Cancelled), guarded.transaction():
        guarded.value["x"] = 2
        raise ml.Cancelled("by hand")
    assert guarded.value == {"x": 1}


# -- other shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "mutate", "expected_after_commit"),
    [
        ([1, 2, 3], lambda v: (v.append(4), v.__delitem__(0)), [2, 3, 4]),
        ({1, 2}, lambda v: (v.add(3), v.discard(1)), {2, 3}),
        (bytearray(b"abc"), lambda v: v.extend(b"def"), bytearray(b"abcdef")),
    ],
    ids=["list", "set", "bytearray"],
)
def test_sequences_and_sets(initial: Any, mutate: Any, expected_after_commit: Any) -> None:
    original = copy.copy(initial)
    guarded = ml.Guarded(initial, track=False)
    transaction = guarded.transaction()

    def task() -> None:
        with transaction:
            mutate(guarded.value)
            allocate_forever()

    interrupted(task)
    assert guarded.value is initial and guarded.value == original
    assert transaction.report is not None and transaction.report.restored == (
        type(initial).__name__,
    )

    with guarded.transaction():
        mutate(guarded.value)
    assert guarded.value == expected_after_commit


def test_rebinding_the_value_is_rolled_back() -> None:
    counter = ml.Guarded(0, name="counter", track=False)
    transaction = counter.transaction()

    def task() -> None:
        with transaction:
            counter.value += 41
            allocate_forever()

    interrupted(task)
    assert counter.value == 0
    assert transaction.report == ml.RollbackReport(restored=("counter",))

    items = [1]
    listed = ml.Guarded(items, track=False)

    def rebind() -> None:
        with listed.transaction():
            listed.value = [9, 9]
            allocate_forever()

    interrupted(rebind)
    assert listed.value is items and items == [1]


def test_nothing_to_roll_back_is_reported_as_such() -> None:
    guarded = ml.Guarded([1], track=False)
    report = guarded.rollback(guarded.checkpoint())
    assert not report and report.describe() == "nothing to roll back"


# -- deeper state -------------------------------------------------------------------------------


def test_custom_snapshot_and_restore_for_deep_state() -> None:
    def restore(value: dict[str, list[int]], state: dict[str, list[int]]) -> None:
        value.clear()
        value.update(state)

    deep = ml.Guarded(
        {"inner": [1]}, snapshot=copy.deepcopy, restore=restore, name="deep", track=False
    )
    transaction = deep.transaction()

    def task() -> None:
        with transaction:
            deep.value["inner"].append(2)  # in place: undone this time
            allocate_forever()

    interrupted(task)
    assert deep.value == {"inner": [1]}
    assert transaction.report == ml.RollbackReport(restored=("deep",))


def test_snapshot_and_restore_must_come_together() -> None:
    with pytest.raises(TypeError, match="both"):
        ml.Guarded({}, snapshot=dict)
    with pytest.raises(TypeError, match="both"):
        ml.Guarded({}, restore=lambda v, s: None)


class Account:
    """An object that knows how to snapshot itself."""

    def __init__(self) -> None:
        self.balance = 100
        self.history: list[int] = []

    def __snapshot__(self) -> tuple[int, list[int]]:
        return self.balance, list(self.history)

    def __restore__(self, state: tuple[int, list[int]]) -> None:
        self.balance, history = state
        self.history[:] = history

    def withdraw(self, amount: int) -> None:
        self.history.append(-amount)
        allocate_forever()  # interrupted half-way: history updated, balance not
        self.balance -= amount


def test_snapshot_and_restore_methods() -> None:
    account = Account()
    history = account.history
    guarded = ml.Guarded(account, track=False)

    def task() -> None:
        with guarded.transaction():
            account.withdraw(30)

    interrupted(task)
    assert (account.balance, account.history) == (100, [])
    assert account.history is history


# -- the task-level pattern -------------------------------------------------------------------


def test_task_level_rollback_decided_from_the_result() -> None:
    """Do not rely on the exception: checkpoint before the task, roll back iff ``Error``. This
    also undoes transactions that committed before the interrupt arrived."""
    guarded = ml.Guarded({"step": 0}, track=False)

    def task() -> None:
        with guarded.transaction():
            guarded.value["step"] = 1  # committed
        allocate_forever()

    checkpoint = guarded.checkpoint()
    result = ml.limit_allocations(task, limit=BUDGET)
    assert isinstance(result, ml.Error)
    assert guarded.value == {"step": 1}  # the committed transaction stayed
    report = guarded.rollback(checkpoint)
    assert guarded.value == {"step": 0} and report.changed == ("step",)


def test_rollback_in_a_worker_thread_on_a_token() -> None:
    guarded = ml.Guarded({"n": 0}, track=False)
    token = ml.Token()
    started = threading.Event()

    def task() -> None:
        with guarded.transaction():
            guarded.value["n"] = 1
            started.set()
            while True:  # allocates nothing: only the token's delivery can stop it
                touch()

    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(ml.limit_with_token(task, token=token)))
    worker.start()
    assert started.wait(30)
    time.sleep(0.01)
    token.set()
    worker.join(30)
    assert not worker.is_alive()
    assert isinstance(out[0], ml.Error) and guarded.value == {"n": 0}


def test_restore_runs_masked() -> None:
    """A token set while ``restore`` runs does not interrupt it (it would leave the value
    half-restored); it arrives after the transaction."""
    token = ml.Token()
    progress: list[str] = []

    def restore(value: list[int], state: list[int]) -> None:
        setter = threading.Thread(target=token.set)
        setter.start()
        setter.join(30)
        for i, item in enumerate(state):
            time.sleep(0.005)  # delivery points, and time for re-deliveries
            value[i] = item
        progress.append("restored")

    guarded = ml.Guarded([0, 0, 0], snapshot=list, restore=restore, track=False)

    def task() -> None:
        with guarded.transaction():
            guarded.value[:] = [1, 1, 1]
            raise ml.Cancelled("interrupted by hand, to reach restore")

    result = ml.limit_with_token(task, token=token)
    assert isinstance(result, ml.Error)
    assert progress == ["restored"] and guarded.value == [0, 0, 0]


# -- reports and tracking -----------------------------------------------------------------------


def test_reports_merge() -> None:
    a = ml.RollbackReport(added=("x",))
    b = ml.RollbackReport(changed=("y",), restored=("guard",))
    merged = a.merge(b)
    assert merged == ml.RollbackReport(added=("x",), changed=("y",), restored=("guard",))
    assert merged.describe() == "rolled back: x (added), y (changed), guard (restored)"
    assert not ml.RollbackReport()


def test_tracked_guards_are_weakly_registered() -> None:
    tracked = ml.Guarded({}, name="tracked-for-the-cell-runner")
    untracked = ml.Guarded({}, name="untracked", track=False)
    names = [g.name for g in _rollback.tracked_guards()]
    assert "tracked-for-the-cell-runner" in names and "untracked" not in names
    del tracked, untracked
    gc.collect()
    assert "tracked-for-the-cell-runner" not in [g.name for g in _rollback.tracked_guards()]
