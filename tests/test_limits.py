"""Every input checked before work starts: numeric ranges, files, output folders, usage errors as one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conceptkit import ui
from conceptkit.cli import app
from conceptkit.cli import limits
from _cli import one_line_error

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def _numeric_options(command, path=""):
    for p in command.params:
        if p.bare_type() in ("int", "float"):
            yield path, p.name
    for name, sub in getattr(command, "commands", {}).items():
        yield from _numeric_options(sub, f"{path} {name}".strip())


def test_every_numeric_option_of_every_command_has_a_declared_range():
    found = list(_numeric_options(typer.main.get_command(app)))
    assert len(found) > 40  # the walk really reached the commands' options
    missing = [(c, n) for c, n in found if limits.LIMITS.get(n) is None]
    assert not missing, missing


@pytest.mark.parametrize("args, fragment", [
    (["harvest", "a cat", "--samples", "1000000000"], "--samples must be between 1 and 100000 (got 1000000000)"),
    (["harvest", "a cat", "--steps", "1001"], "--steps must be between 1 and 1000"),
    (["harvest", "a cat", "--seed", str(2**63)], "--seed must be between 0 and 4294967295"),
    (["harvest", "a cat", "--height", "100000"], "--height must be between 8 and 8192"),
    (["harvest", "a cat", "--guidance", "inf"], "--guidance must be a finite number"),
    (["harvest", "a cat", "--guidance", "nan"], "--guidance must be a finite number"),
    (["sliders", "a cat", "--rank", "100000"], "--rank must be between 1 and 128"),
    (["sliders", "a cat", "--pairs", "100000000"], "--pairs must be between 1 and 1024"),
    (["sliders", "a cat", "--lr", "inf"], "--lr must be a finite number"),
    (["sliders", "a cat", "--count", "65"], "--count must be between 1 and 64"),
    (["generate", "a cat", "--count", "0"], "--count must be between 1 and 100000"),
    (["generate", "a cat", "--slider", "0=1e30"], "scale must be a finite number between -100 and 100"),
    (["generate", "a cat", "--sweep", "0=-1e30:2:5"], "LO, HI between -100 and 100"),
    (["cluster", "a red circle", "--k", "1"], "--k must be between 2 and 256"),
    (["cluster", "a red circle", "--sweep-temporal-dim", "1:100000000"], "at most 64"),
    (["cluster", "a red circle", "--sweep-tau", "0.1:0.9:1000000000000"], "at most 64"),
    (["evaluate", "sliders", "x", "--scale", "nan"], "--scale must be a finite number"),
    (["harvest", "a cat", "--bogus"], "No such option: --bogus"),  # Typer's own usage errors: one line too
    (["cache", "path", "--json", "true"], "unexpected extra argument"),
    (["harvest", "a cat", "--samples", "abc"], "--samples"),
])
def test_out_of_range_input_is_refused_at_once_in_one_line(args, fragment):
    line = one_line_error(invoke(*args))
    assert fragment in line, line
    assert not Path(os.environ["CONCEPTKIT_HOME"]).exists()  # nothing written, nothing loaded


def test_prompts_files_that_are_not_small_text_are_refused_before_reading(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would wait forever
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"a cat\x00\x01\x02")
    latin = tmp_path / "l.txt"
    latin.write_bytes("un caf\xe9".encode("latin-1"))
    huge = tmp_path / "h.txt"
    huge.write_text("a cat\n" * 200_000)
    for path, fragment in [("/dev/zero", "not a regular file"), (fifo, "not a regular file"), (tmp_path, "not a regular file"),
                           (binary, "binary file"), (latin, "not UTF-8"), (huge, "at most 1,048,576")]:
        line = one_line_error(invoke("harvest", "--prompts-file", str(path)))
        assert fragment in line and "--prompts-file" in line, line


def test_output_folders_are_checked_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for args in (["generate", "a cat", "--out", str(blocker)], ["generate", "a cat", "--out", str(blocker / "sub")],
                 ["harvest", "a cat", "--save-images", str(blocker)], ["sliders", "export", "nope", str(blocker)],
                 ["evaluate", "sliders", "nope", "--report", str(blocker)]):
        line = one_line_error(invoke(*args))
        assert str(blocker) in line and ("is a file" in line), line
    assert not Path(os.environ["CONCEPTKIT_HOME"]).exists()


def test_version_and_plain_flags_in_help():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip().startswith("conceptkit ")
    help_text = invoke("cache", "path", "--help").output
    assert "--json" in help_text and "<bool>" not in help_text.split("--json", 1)[1].splitlines()[0]


def test_json_output_never_holds_nan(capsys):
    ui.print_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -math.inf}, "e": 2.5})
    doc = json.loads(capsys.readouterr().out)  # strict JSON
    assert doc == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2.5}


def test_progress_off_a_terminal_prints_plain_lines(monkeypatch):
    lines = []
    monkeypatch.setattr(ui.err, "print", lambda text, **kw: lines.append(text))
    clock = iter(range(0, 1000))  # each reading of the clock is a second later
    monkeypatch.setattr(ui.time, "perf_counter", lambda: float(next(clock)))
    with ui._progress_lines("harvest", "samples", every_s=5.0) as update:
        for done in range(0, 11):
            update(done, 10, loss=0.5)
    assert 3 <= len(lines) <= 7  # every few seconds, not once per update and not only at the end
    assert lines[-1].startswith("harvest 10/10") and "loss 0.5" in lines[-1]
    assert sum(line.startswith("harvest 10/10") for line in lines) == 1


def test_light_commands_do_not_import_the_model_libraries(tmp_path):
    code = ("import sys; from conceptkit.cli import app; "
            "from typer.testing import CliRunner; r = CliRunner().invoke(app, ['cache', 'path', '--json']); "
            "assert r.exit_code == 0, r.output; print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    env = {**os.environ, "CONCEPTKIT_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_sigterm_stops_a_harvest_like_ctrl_c_and_a_rerun_resumes(tmp_path):
    """A `kill` mid-harvest: exit 130 with the interrupted line, shards kept, and the rerun completes them."""
    import signal
    import time

    env = {**os.environ, "CONCEPTKIT_HOME": str(tmp_path / "home")}
    args = [sys.executable, "-m", "conceptkit", "harvest", "a shape", "--samples", "400", "--steps", "4", "--batch-size", "8"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "home").rglob("shard-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)  # wait until real work is under way
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    done = subprocess.run([*args[:6], "8", "--steps", "4", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"] == 8


def test_a_harvest_that_will_not_fit_on_the_disk_is_refused_before_sampling(monkeypatch):
    import shutil as sh
    from collections import namedtuple

    from conceptkit import harvest
    from conceptkit.errors import StoreError
    from conceptkit.models.load import load_model

    model = load_model("tiny-sd", device="cpu")
    cfg = harvest.HarvestConfig(prompts=("a cat",), samples=64, steps=4)
    need = __import__("conceptkit.capacity", fromlist=["x"]).harvest_bytes(model, cfg.resolved(model), 64)
    assert need == 64 * 4 * 2 * (4 * 16 * 16) * 2  # trajectories x steps x (x0, x_t) x latent 4x16x16 x float16
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(need, need, need // 2))
    with pytest.raises(StoreError, match="needs about .* on disk"):
        harvest.run(model, cfg)
    assert not list(Path(os.environ["CONCEPTKIT_HOME"]).rglob("shard-*"))


def test_manifests_are_strict_json_too(tmp_path):
    from conceptkit import store

    store.write_json(tmp_path / "m.json", {"loss": {"first": float("nan"), "last": 0.5}, "xs": [float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "loss": {"first": None, "last": 0.5}, "xs": [None]}


def test_sliders_dry_run_prints_the_plan_with_the_model_s_defaults_and_writes_nothing():
    r = invoke("sliders", "a cat", "-m", "tiny-sd", "--count", "2", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["dry_run"] is True and doc["defaults"]["profile"] == "test-model"
    assert doc["defaults"]["from_profile"] == ["samples", "train_steps", "pairs", "lr", "calibration_seeds", "directions", "x0"]
    plan = doc["plan"]
    assert plan["trajectories"] == 16 and plan["train_steps"] == 100 and plan["sliders"] == 2
    assert plan["harvest_bytes"] == 16 * plan["steps"] * 2 * 4 * 16 * 16 * 2  # tiny-sd latents are 4 x 16 x 16
    assert plan["unet_call_s"] > 0 and plan["harvest_s"] > 0 and plan["train_s"] > 0
    assert not Path(os.environ["CONCEPTKIT_HOME"]).exists() or not list(Path(os.environ["CONCEPTKIT_HOME"]).rglob("manifest.json"))
    given = json.loads(invoke("sliders", "a cat", "-m", "tiny-sd", "--samples", "8", "--lr", "0.01", "--dry-run", "--json").stdout)
    assert given["defaults"]["from_profile"] == ["train_steps", "pairs", "calibration_seeds", "directions", "x0"]
    assert given["plan"]["trajectories"] == 8


def test_each_kind_of_model_gets_its_own_slider_defaults():
    from conceptkit.sliders import defaults as sd

    assert sd.profile_name("toy", "sd1", 20) == "toy"
    assert sd.profile_name("tiny-sdxl", "sdxl", 20) == "test-model"
    assert sd.profile_name("runwayml/stable-diffusion-v1-5", "sd1", 50) == "sd"
    assert sd.profile_name("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 30) == "sdxl"
    assert sd.profile_name("stabilityai/sdxl-turbo", "sdxl", 1) == "few-step"
    ref = sd.PROFILES["sdxl"]
    assert (ref.samples, ref.train_steps, ref.pairs, ref.lr) == (1000, 3000, 1, 2e-3)  # the reference implementation's
    assert (ref.directions, ref.x0) == ("pca", "all")  # the paper's
    toy = sd.PROFILES["toy"]
    assert (toy.samples, toy.directions, toy.x0, toy.calibration_seeds) == (256, "ica", "final", 8)  # measured on the toy
    values, from_profile = sd.resolve(ref, samples=None, train_steps=50, pairs=None, lr=None)
    assert values == {"samples": 1000, "train_steps": 50, "pairs": 1, "lr": 2e-3} and from_profile == ["samples", "pairs", "lr"]
