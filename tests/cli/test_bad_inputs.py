"""Every bad input of the table in docs/bad_inputs.md fails (or, for an odd input that still trains, warns), naming
the file, key or value at fault, leaves the outputs of an earlier run in the working directory as they were, and
says exactly what the committed table (benchmarks/results/bad_inputs.md) says it does."""

from __future__ import annotations

import pytest

from benchmarks.bad_inputs import CASES, TABLE, read_table, row, trigger


def test_the_committed_table_has_a_row_per_case_in_order():
    assert list(read_table()) == [case.name for case in CASES], f"regenerate {TABLE}: python -m benchmarks.bad_inputs"


def test_the_docs_show_the_committed_table_verbatim():
    """docs/bad_inputs.md includes the generated table as it is committed (copy it again after a regeneration)."""
    from conftest import REPO

    table = (REPO / "benchmarks/results/bad_inputs.md").read_text().strip()
    body = "\n".join(line for line in table.splitlines() if line.startswith("|"))
    assert body in (REPO / "docs/bad_inputs.md").read_text()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_fails_naming_what_is_wrong(case):
    kind, message, intact = trigger(case)
    assert intact, "the earlier run's outputs changed"
    for needed in case.expect:
        assert needed in message, (kind, message)
    # The same row as the committed table's: its message column is what this case says now.
    committed = read_table().get(case.name)
    assert committed == row(case, kind, message), f"regenerate {TABLE}: python -m benchmarks.bad_inputs"
