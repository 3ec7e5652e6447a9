"""Healing's resumable checkpoint (also ternary distillation's and AQLM fine-tuning's): one that cannot be
read is discarded with a one-line warning and training starts over; it is written as one set; a finished one
keeps no optimizer moments; a resumed run says so once."""

from __future__ import annotations

import errno
import json
import shutil

import pytest

from edgekit.calibration import CalibConfig
from edgekit.errors import DiskFullError
from edgekit.model import HFCheckpoint

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

SPEC = "depth:1"
CALIB = CalibConfig(samples=6, seqlen=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny 2-block Llama, its depth-pruned copy, a finished 2-step heal's state root to copy from, and
    the state root of the same heal stopped by Ctrl-C after its first step."""
    from edgekit.converters import structure
    from edgekit.converters.structure.heal import HealConfig, heal
    from tests.helpers import build_tiny_model

    root = tmp_path_factory.mktemp("healck")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEKIT_HOME", str(root / "home"))  # the calibration cache
    try:
        src = build_tiny_model(root / "llama", "LlamaForCausalLM", hidden=64, ffn=128, layers=2)
        ckpt = HFCheckpoint.open(src)
        pruned, _ = structure.apply(ckpt, SPEC, CALIB, root / "pruned")
        cfg = HealConfig(minutes=5, max_steps=2, lr=1e-3, batch=2, checkpoint_s=0, eval_seqs=1)
        heal(ckpt, pruned, SPEC, cfg, CALIB, state_root=root / "state", in_place=False)

        def stop_after_1(desc, done, total):
            if desc.startswith("healing: step 1,"):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            heal(ckpt, pruned, SPEC, cfg, CALIB, stop_after_1, state_root=root / "stopped", in_place=False)
        yield ckpt, pruned, cfg, root / "state", root / "stopped"
    finally:
        mp.undo()


def _run(setup, state_root, notes: list[str] | None = None):
    from edgekit.converters.structure.heal import heal

    ckpt, pruned, cfg = setup[:3]
    seen: list[str] = []
    report = heal(ckpt, pruned, SPEC, cfg, CALIB, lambda d, a, b: seen.append(d), state_root=state_root,
                  in_place=False)
    if notes is not None:
        notes.extend(d for d in seen if d.startswith("note: "))
    return report, [d for d in seen if d.startswith("healing: step")]


def _state(tmp_path, setup, which: int = 3):
    root = tmp_path / "state"
    shutil.copytree(setup[which], root)
    (folder,) = root.iterdir()
    return root, folder


def _bad_student(folder):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "student.safetensors"))
    name = next(n for n, t in sd.items() if t.ndim == 2)
    sd[name] = torch.zeros(3, 5)
    save_file(sd, str(folder / "student.safetensors"))


DAMAGE = {
    "state.json garbage": lambda f: (f / "state.json").write_text('{"step": "abc"'),
    "state.json wrong types": lambda f: (f / "state.json").write_text('{"step": "abc", "elapsed_s": 1}'),
    "student truncated": lambda f: f.joinpath("student.safetensors").write_bytes(
        f.joinpath("student.safetensors").read_bytes()[:1000]),
    "student garbage": lambda f: (f / "student.safetensors").write_bytes(b"\x00garbage" * 10),
    "student missing": lambda f: (f / "student.safetensors").unlink(),
    "state.json missing": lambda f: (f / "state.json").unlink(),
    "student shape mismatch": _bad_student,
}
# Only a run that did not finish keeps the optimizer's moments.
DAMAGE_STOPPED = {
    "optim missing": lambda f: (f / "optim.safetensors").unlink(),
    "optim truncated": lambda f: f.joinpath("optim.safetensors").write_bytes(
        f.joinpath("optim.safetensors").read_bytes()[:-100]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_unreadable_heal_checkpoint_is_discarded_and_training_starts_over(setup, tmp_path, damage):
    root, folder = _state(tmp_path, setup)
    report, steps = _run(setup, root)
    assert steps == [] and report["steps"] == 2  # intact and finished: reused as is
    DAMAGE[damage](folder)
    with pytest.warns(UserWarning) as rec:
        report, steps = _run(setup, root)
    lines = [str(w.message) for w in rec if "could not be read" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0], [str(w.message) for w in rec]
    assert str(folder) in lines[0] and "starts over" in lines[0]
    assert steps[0].startswith("healing: step 1") and report["steps"] == 2  # trained afresh
    info = json.loads((folder / "state.json").read_text())
    assert info["step"] == 2 and info["done"]
    assert sorted(p.name for p in root.iterdir()) == [folder.name]  # no scratch folders left
    report, steps = _run(setup, root)  # and what it wrote resumes
    assert steps == [] and report["steps"] == 2


@pytest.mark.parametrize("damage", list(DAMAGE_STOPPED))
def test_unreadable_moments_of_a_stopped_heal_are_discarded(setup, tmp_path, damage):
    root, folder = _state(tmp_path, setup, which=4)
    DAMAGE_STOPPED[damage](folder)
    with pytest.warns(UserWarning, match="could not be read"):
        report, steps = _run(setup, root)
    assert steps[0].startswith("healing: step 1,") and report["steps"] == 2  # trained afresh


def test_a_finished_heal_keeps_the_student_and_its_record_only(setup, tmp_path):
    """The finished state is the cache a rerun of the recipe reuses: the trained weights and state.json. The
    optimizer's moments (twice the student) only serve a resume; a finished state an earlier version wrote
    with them is reused and loses them."""
    root, folder = _state(tmp_path, setup)
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "student.safetensors"]
    info = json.loads((folder / "state.json").read_text())
    assert info["done"] and info["step"] == 2 and info["finished"]
    (stopped,) = setup[4].iterdir()
    shutil.copy(stopped / "optim.safetensors", folder / "optim.safetensors")  # as an earlier version left it
    notes: list[str] = []
    report, steps = _run(setup, root, notes)
    assert steps == [] and report["steps"] == 2  # reused, not trained again
    assert notes == [f"note: healing finished earlier (2 steps, {info['finished']}): reusing it from {folder}"]
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "student.safetensors"]


def test_a_resumed_heal_says_so_once(setup, tmp_path):
    root, folder = _state(tmp_path, setup, which=4)
    info = json.loads((folder / "state.json").read_text())
    assert info["step"] == 1 and not info["done"] and info["stopped"] == "Ctrl-C"
    assert (folder / "optim.safetensors").is_file()  # a resume needs the moments
    notes: list[str] = []
    report, steps = _run(setup, root, notes)
    assert len(notes) == 1 and notes[0].startswith(f"note: healing resumes from step 1, saved {info['saved']} by a "
                                                   "run stopped by Ctrl-C (")
    assert notes[0].endswith(" of 5.0 min spent)") and "\n" not in notes[0]
    assert len(steps) == 1 and steps[0].startswith("healing: step 2,") and report["steps"] == 2
    after = json.loads((folder / "state.json").read_text())
    assert after["done"] and "stopped" not in after and not (folder / "optim.safetensors").exists()


def test_a_heal_stopped_by_a_signal_says_so_when_it_resumes(setup, tmp_path):
    """kill or a closed terminal reach heal as SystemExit (edgekit's CLI turns SIGTERM and SIGHUP into one)."""
    from edgekit.converters.structure.heal import heal

    ckpt, pruned, cfg = setup[:3]

    def killed_after_1(desc, done, total):
        if desc.startswith("healing: step 1,"):
            raise SystemExit(143)

    with pytest.raises(SystemExit):
        heal(ckpt, pruned, SPEC, cfg, CALIB, killed_after_1, state_root=tmp_path / "state", in_place=False)
    notes: list[str] = []
    report, steps = _run(setup, tmp_path / "state", notes)
    assert len(notes) == 1 and notes[0].startswith("note: healing resumes from step 1,") and \
        "by a run stopped by a signal" in notes[0] and report["steps"] == 2


def test_heal_checkpoint_is_written_as_one_set(setup, tmp_path, monkeypatch):
    """A save that fails between its files (here a full disk at the optimizer's) leaves the previous
    checkpoint whole: never a new student beside an old step count. (Training warns and goes on past a failed
    save between checkpoints; the save when it stops, here at a Ctrl-C, is the one that fails the run.)"""
    import safetensors.torch

    from edgekit.converters.structure.heal import HealConfig, heal

    ckpt, pruned = setup[:2]
    cfg = HealConfig(minutes=5, max_steps=6, lr=1e-3, batch=2, checkpoint_s=0, eval_seqs=1)
    root = tmp_path / "state"
    real_save = safetensors.torch.save_file
    full = {"on": False}
    kept: dict[str, bytes] = {}

    def save_file(tensors, filename, *a, **k):
        if full["on"] and str(filename).endswith("optim.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, *a, **k)

    def progress(desc, done, total):
        if desc.startswith("healing: step 3,"):  # the checkpoint of step 2 is on disk; step 3's save is next
            (folder,) = root.iterdir()
            kept.update({p.name: p.read_bytes() for p in folder.iterdir()})
            full["on"] = True
        if desc.startswith("healing: step 5,"):
            raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(DiskFullError), pytest.warns(UserWarning, match="progress could not be saved"):
        heal(ckpt, pruned, SPEC, cfg, CALIB, progress, state_root=root, in_place=False)
    (folder,) = root.iterdir()  # no scratch folder left beside it
    assert json.loads(kept["state.json"])["step"] == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept
    full["on"] = False
    seen: list[str] = []
    report = heal(ckpt, pruned, SPEC, cfg, CALIB, lambda d, a, b: seen.append(d), state_root=root, in_place=False)
    assert seen[0].startswith("note: healing resumes from step 2,") and "by a run that did not finish" in seen[0]
    assert seen[1].startswith("healing: step 3,") and report["steps"] == 6  # resumed from the intact checkpoint


def test_a_snapshot_or_checkpoint_that_cannot_be_written_only_warns(setup, tmp_path, monkeypatch):
    """A curve's snapshot and the resume point between checkpoints only save work later: on a full disk
    (safetensors says so with SafetensorError, not OSError) training warns and goes on to the end."""
    import os

    import safetensors.torch
    from safetensors import SafetensorError

    from edgekit.converters.structure.heal import HealConfig, heal

    ckpt, pruned = setup[:2]
    cfg = HealConfig(minutes=5, max_steps=4, lr=1e-3, batch=2, checkpoint_s=0, eval_seqs=1, snapshots=(0,))
    root = tmp_path / "state"
    real_save = safetensors.torch.save_file
    step = {"n": 0}

    def save_file(tensors, filename, *a, **k):
        name = os.path.basename(filename)
        if name.startswith(".snapshot_") or (step["n"] == 2 and name == "optim.safetensors"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, *a, **k)

    def progress(desc, done, total):
        if desc.startswith("healing: step "):
            step["n"] = int(desc.split()[2].rstrip(","))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.warns(UserWarning) as rec:
        report = heal(ckpt, pruned, SPEC, cfg, CALIB, progress, state_root=root, in_place=False)
    said = [str(w.message) for w in rec]
    assert any(m.startswith("the 0-minute snapshot's weights were not kept: the disk filled up") for m in said), said
    assert any(m.startswith("healing progress could not be saved (a resume starts from the last save)")
               for m in said), said
    assert report["steps"] == 4 and len(report["curve"]) == 1
    (folder,) = root.iterdir()  # no scratch folder left beside it, and no half-written snapshot in it
    assert json.loads((folder / "state.json").read_text())["done"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith((".", "snapshot_"))]


def test_cli_convert_with_a_damaged_heal_checkpoint(setup, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    args = ["convert", str(setup[0].path), "--bits", "8", "--prune", SPEC, "--heal", "1s", "-t", "1",
            "--calib-samples", "6", "--calib-seqlen", "16"]
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    (folder,) = (tmp_path / "home" / "heal").iterdir()
    (folder / "state.json").write_text('{"step": "abc"')
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "internal error" not in r.output and "Traceback" not in r.output
    warned = [ln for ln in r.output.splitlines() if "could not be read" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: the saved healing progress in"), r.output
    assert (tmp_path / "b" / "edgekit.json").is_file()
    assert json.loads((folder / "state.json").read_text())["done"]


def test_cli_says_once_that_it_resumes_and_that_it_reuses(setup, tmp_path, monkeypatch):
    """A rerun after Ctrl-C says from which step it resumes, one 'note:' line (not a progress label the next
    step overwrites); a rerun after it finished says it reuses the finished training."""
    import contextlib

    from typer.testing import CliRunner

    from edgekit.cli import convert_cmd
    from edgekit.cli.main import app

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    args = ["convert", str(setup[0].path), "--bits", "8", "--prune", SPEC, "--heal", "2s", "-t", "1",
            "--calib-samples", "6", "--calib-seqlen", "16"]

    @contextlib.contextmanager
    def ctrl_c_after_step_1(enabled=True):
        def progress(desc, done, total):
            if desc.startswith("healing: step 1,"):
                raise KeyboardInterrupt
        yield progress

    with monkeypatch.context() as m:
        m.setattr(convert_cmd, "progress_bar", ctrl_c_after_step_1)
        r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert r.exit_code == 130 and "healing progress is saved at step 1" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.output.splitlines() if ln.startswith("note: healing")]
    assert len(notes) == 1 and notes[0].startswith("note: healing resumes from step 1, saved ") and \
        "by a run stopped by Ctrl-C" in notes[0], r.output
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.output.splitlines() if ln.startswith("note: healing")]
    (folder,) = (tmp_path / "home" / "heal").iterdir()
    assert len(notes) == 1 and "finished earlier" in notes[0] and notes[0].endswith(f"reusing it from {folder}")
