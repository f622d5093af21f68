"""Fixtures of the ops tests: the hostile corpus, and the real loaders as an oracle."""

from __future__ import annotations

import pytest

from tests.loader_oracle import LoaderOracle
from tests.ops.malicious_corpus import CorpusItem, make_corpus


@pytest.fixture(scope="module")
def malicious_corpus(tmp_path_factory) -> list[CorpusItem]:
    """Every hostile file of malicious_corpus.py, written once per test module; none may ever run."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def oracle():
    """The real loaders, in a hooked worker subprocess (loader_oracle.py)."""
    with LoaderOracle() as o:
        yield o
