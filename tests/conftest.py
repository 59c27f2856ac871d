"""Every test runs against its own store, offline."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# One thread count for every test, whatever the shell says: tiny models gain nothing from several
# threads, oversubscribed threads on a shared 2-core machine make them tens of times slower, and
# results must not depend on the machine's default. CONCEPTKIT_TEST_THREADS=2 runs the suite with
# 2 threads (the statistical tests' margins were measured with 1 and 2). Subprocesses inherit it.
TEST_THREADS = int(os.environ.get("CONCEPTKIT_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)

import torch  # noqa: E402  after OMP_NUM_THREADS, which torch reads when it starts

torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CONCEPTKIT_MODEL", raising=False)
    yield
