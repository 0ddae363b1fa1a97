"""The self-check (agent/selfcheck.py): which platform views a protection fools, what the record
keeps of it (never a true label), and whether a later copy still holds."""

import numpy as np
import pytest

from agent import selfcheck
from agent.selfcheck import SelfCheck

ORIGINAL, PROTECTED, RESIZED_COPY, PURIFIED_COPY = (np.full((40, 60, 3), v, np.uint8) for v in (10, 20, 30, 40))
LABELS = {10: {"crop": 1, "squash": 2}, 20: {"crop": 7, "squash": 2}, 30: {"crop": 7, "squash": 9},
          40: {"crop": 1, "squash": 2}}


@pytest.fixture
def classifier(monkeypatch):
    monkeypatch.setattr(selfcheck, "labels", lambda pixels: LABELS[int(pixels[0, 0, 0])])


def test_only_fooled_views_and_their_wrong_labels_are_kept(classifier):
    check = selfcheck.measure(ORIGINAL, PROTECTED)
    assert check.fooled == {"crop": 7} and check.asr == 0.5
    assert check.to_params() == {"fooled": {"crop": 7}, "views": 2}
    assert 1 not in check.to_params()["fooled"].values() and 2 not in check.to_params()["fooled"].values()
    assert SelfCheck.from_params(check.to_params()) == check
    assert SelfCheck.from_params(None) is None and SelfCheck.from_params({"views": 2}) is None


def test_a_copy_holds_where_it_keeps_the_protected_label(classifier):
    check = selfcheck.measure(ORIGINAL, PROTECTED)
    assert selfcheck.holds(check, RESIZED_COPY) == 0.5
    assert selfcheck.holds(check, PURIFIED_COPY) == 0.0


def test_without_the_classifier_there_is_no_self_check(monkeypatch):
    monkeypatch.setattr(selfcheck, "_classifier", lambda: None)
    assert selfcheck.labels(ORIGINAL) is None
    assert selfcheck.measure(ORIGINAL, PROTECTED) is None
    assert selfcheck.holds(SelfCheck({"crop": 7}), PROTECTED) is None


def test_the_real_classifier_reads_grey_colour_alpha_and_16_bit_alike():
    if not selfcheck.available():
        pytest.skip("the bundled classifier's weights are not installed")
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    assert set(selfcheck.labels(colour)) == {"crop", "squash"}
    assert selfcheck.labels(colour.astype(np.uint16) * 257) == selfcheck.labels(colour)
    rgba = np.dstack([colour, np.full((120, 160), 255, np.uint8)])
    assert selfcheck.labels(rgba) == selfcheck.labels(colour)
    grey = colour[..., 0]
    assert selfcheck.labels(grey) == selfcheck.labels(np.dstack([grey] * 3))
