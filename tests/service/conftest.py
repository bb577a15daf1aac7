from __future__ import annotations

import pytest

from tests.factories import make_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The tiny test tokenizer (the HTTP tests' scripted engines speak it)."""
    return make_tokenizer(tmp_path_factory.mktemp("tok"))
