"""Every test runs against its own store, offline."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models gain nothing from several threads, and on a shared 2-core machine oversubscribed
# threads make them tens of times slower. Subprocesses (CLI tests) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CONCEPTKIT_MODEL", raising=False)
    yield
