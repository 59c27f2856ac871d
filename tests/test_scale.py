"""Scale-out: a two-process `accelerate launch` harvest equals the single-process one (opt-in: -m slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conceptkit import harvest


def _two_and_one(args: list[str], tmp_path, timeout: int) -> tuple[dict, dict]:
    """The `--json` documents of a two-process `accelerate launch` and of a single-process run of `args`."""
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "CONCEPTKIT_HOME": str(tmp_path / "two")}
    two = subprocess.run([accelerate, "launch", "--num_processes", "2", "--cpu", "-m", "conceptkit", *args],
                         capture_output=True, text=True, env=env, timeout=timeout)
    assert two.returncode == 0, two.stderr
    env["CONCEPTKIT_HOME"] = str(tmp_path / "one")
    one = subprocess.run([sys.executable, "-m", "conceptkit", *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert one.returncode == 0, one.stderr
    return json.loads(two.stdout), json.loads(one.stdout)  # one JSON document per launch


@pytest.mark.slow
def test_two_process_accelerate_harvest_equals_single_process(tmp_path):
    args = ["harvest", "a cat", "--model", "tiny-sd", "--samples", "10", "--steps", "3", "--batch-size", "2", "--json"]
    a, b = _two_and_one(args, tmp_path, 600)
    assert a["key"] == b["key"] and a["available"] == b["available"] == 10 and a["computed"] == 10
    ha, hb = harvest.load_harvest(a["path"]), harvest.load_harvest(b["path"])
    for name in ("x0", "xt", "final", "seeds", "timesteps"):
        assert torch.equal(getattr(ha, name), getattr(hb, name)), name


def test_work_is_split_by_chunk_ownership():
    done = [(0, 2), (5, 6)]
    shares = [harvest._work(done, 11, 3, rank, 2) for rank in range(2)]
    flat = sorted(i for share in shares for batch in share for i in batch)
    assert flat == [2, 3, 4, 6, 7, 8, 9, 10]  # every missing trajectory once
    assert shares[0] == [[2], [6, 7, 8]] and shares[1] == [[3, 4], [9, 10]]


@pytest.mark.slow
def test_two_process_accelerate_sliders_equal_single_process(tmp_path):
    from safetensors.torch import load_file

    args = ["sliders", "a cat", "--model", "tiny-sd", "--count", "3", "--samples", "4", "--encoder", "pixel",
            "--train-steps", "4", "--json"]
    a, b = _two_and_one(args, tmp_path, 900)
    assert [s["label"] for s in a["sliders"]] == [s["label"] for s in b["sliders"]]
    for sa, sb in zip(a["sliders"], b["sliders"]):
        ta, tb = load_file(sa["file"]), load_file(sb["file"])
        assert ta.keys() == tb.keys()
        for k in ta:  # float noise only (see test_sliders' share test): 1% of each factor's norm
            assert (ta[k] - tb[k]).norm() < 1e-2 * tb[k].norm(), k
