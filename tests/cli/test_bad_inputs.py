"""Every bad input of the README's table fails, with a message naming the file, key or value at fault, and leaves
the outputs of an earlier run in the working directory as they were."""

from __future__ import annotations

import pytest

from benchmarks.bad_inputs import CASES, trigger


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_fails_naming_what_is_wrong(case):
    kind, message, intact = trigger(case)
    assert intact, "the earlier run's outputs changed"
    for needed in case.expect:
        assert needed in message, (kind, message)
