"""Integers past Python's int-to-text limit (10**5000) in a checkpoint's structure.

``str()`` of such an int raises ValueError ("Exceeds the limit (4300 digits)"); in a tree
one is shown as ``{"__int__": "<integer of N bytes>"}`` (as the pickle machine shows an
integer too long to keep), so every tree stays JSON-able and nothing escapes.
"""

from __future__ import annotations

import json

import pytest

import safeckpt
from safeckpt.ops.inspect import describe
from safeckpt.sources import base

pytest.importorskip("torch")

BIG = 10**5000
SHOWN = {"__int__": "<integer of 2077 bytes>"}

# big_int_file (tests/conftest.py): a plain pickle and a torch checkpoint holding BIG as a value and a key.


def test_the_tree_shows_it_briefly(big_int_file):
    with safeckpt.open_source(big_int_file) as source:
        tree = source.tree
    assert tree["n"] == SHOWN
    assert tree["k"] == {"<integer of 2077 bytes>": 1, str(2**70): 2}
    json.dumps(tree)


def test_describe_is_json_able(big_int_file):
    report = describe(big_int_file)
    assert report["structure"]["n"] == SHOWN
    json.dumps(report)


def test_convert_keeps_it_in_the_tree_metadata(big_int_file, tmp_path):
    out = tmp_path / "out.safetensors"
    safeckpt.convert(big_int_file, out)
    assert list(safeckpt.load_file(out)) == ["w"]
    with safeckpt.safe_open(out) as f:
        assert json.loads(f.metadata()["safeckpt.tree"])["n"] == SHOWN


def test_diff_and_verify(big_int_file):
    assert safeckpt.diff(big_int_file, big_int_file).identical
    assert safeckpt.verify(big_int_file).status == "ok"


@pytest.mark.parametrize("value, shown", [
    (2**63, str(2**63)), (-(2**100), str(-(2**100))), (1 << base.MAX_INT_BITS - 1, str(1 << base.MAX_INT_BITS - 1)),
    (1 << base.MAX_INT_BITS, {"__int__": f"<integer of {base.MAX_INT_BITS // 8 + 1} bytes>"}),
    (-BIG, SHOWN),
], ids=["2**63", "-2**100", "widest-in-digits", "narrowest-shown", "-10**5000"])
def test_int_text(value, shown):
    """Digits while they fit well under Python's limit (whatever it is set to), a size after."""
    assert base.int_text(value) == shown
