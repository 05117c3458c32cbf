"""Every bad input of the README's table fails, with a message naming the file, key or value at fault."""

from __future__ import annotations

import pytest

from benchmarks.bad_inputs import CASES, trigger


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_fails_naming_what_is_wrong(case):
    kind, message = trigger(case)
    assert kind != "AssertionError"
    for needed in case.expect:
        assert needed in message, (kind, message)
