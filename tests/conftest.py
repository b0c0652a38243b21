"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest

from leviathan.data import bundled_documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three plays as text files: enough for a 384-piece tokenizer and a few steps."""
    folder = tmp_path_factory.mktemp("corpus")
    for doc in bundled_documents()[:3]:
        (folder / f"{Path(doc.name).stem}.txt").write_text(doc.text[:60_000], encoding="utf-8")
    return folder
