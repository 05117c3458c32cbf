"""SD1.x/2.x (epsilon, v-prediction) and DiT training losses are those of the commit before the model-family
redesign, method by method, on the same batch and seeds (see ``loss_reference.py``)."""

from __future__ import annotations

import json

import pytest
from loss_reference import REFERENCE, compute


@pytest.fixture(scope="module")
def measured():
    return compute()


def test_every_case_keeps_its_loss(measured):
    expected = json.loads(REFERENCE.read_text())
    assert sorted(measured) == sorted(expected)
    for case, values in expected.items():
        assert sorted(measured[case]) == sorted(values), case
        for key, value in values.items():
            assert measured[case][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (case, key)
