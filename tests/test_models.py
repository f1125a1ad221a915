"""Embedded models: found in their packages, chunks joined in order, converted once, clear errors when missing."""

from __future__ import annotations

import sys

import pytest

from selfinterp import models
from selfinterp.errors import UserError


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A three-chunk embedded model in three fake packages, and a converter that records what it got."""
    for i, text in enumerate([b"GGUF-one|", b"two|", b"three"], 1):
        data = tmp_path / "site" / f"fake_part{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"part{i:02d}.bin").write_bytes(text)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = models.EmbeddedModel("Fake.gguf", ("fake_part1", "fake_part2", "fake_part3"), "pip install fake", chunks=True)
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", spec)
    monkeypatch.setenv("SELFINTERP_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(path, target=None):
        calls.append((path.name, path.read_bytes()))
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(models, "convert_gguf", convert)
    return calls


def test_chunks_are_joined_in_order_converted_once_and_the_join_removed(chunked, tmp_path):
    folder = models.resolve_model("fake")
    assert chunked == [("Fake.gguf", b"GGUF-one|two|three")]
    assert models.resolve_model("fake") == folder and len(chunked) == 1  # cached: no second join or conversion
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"Fake-{models._file_key(*models.embedded_files('fake'))}"]


def test_a_missing_chunk_package_names_the_install_command(chunked, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.endswith("site")])
    sys.modules.pop("fake_part1", None)
    with pytest.raises(UserError, match="embedded model fake is not installed: run `pip install fake`"):
        models.resolve_model("fake")


def test_the_default_embedded_model_key_is_unchanged(tmp_path):
    """One file gives the same cache key as before chunked models existed, so old conversions stay valid."""
    import hashlib

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    st = path.stat()
    old = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    assert models._file_key(path) == old
