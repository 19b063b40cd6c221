"""Crash safety: a process killed while saving never leaves a corrupt tuner or checkpoint; a killed training resumes.

Kills are real (SIGKILL): a helper process truncates its own half-written file and kills itself, or a training
process is killed from outside at an arbitrary step.
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from scedit_ui import cli
from scedit_ui.tuner_library import TunerLibrary
from tuners import SCTuner, SkipLayout, TunerMetadata, load_tuner, save_tuner

LAYOUT = SkipLayout((8, 16), (False, True), ((1,), (0,)))
REPO = Path(__file__).resolve().parent.parent

# Runs in a child process: the real writer writes the temporary file, which is then cut in half, and the
# process kills itself with SIGKILL, as a power cut or the OOM killer would in the middle of a save.
KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys

    def cut_in_half_and_die(path):
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
""")

SAVE_TUNER_AND_DIE = KILL_MID_WRITE + textwrap.dedent("""
    import torch
    import tuners.io
    from tuners import SCTuner, SkipLayout, TunerMetadata

    real_save_file = tuners.io.save_file

    def save_file(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        cut_in_half_and_die(path)

    tuners.io.save_file = save_file
    tuner = SCTuner(SkipLayout((8, 16), (False, True), ((1,), (0,))), 1.0)
    torch.nn.init.ones_(tuner.adapters[0].ln2.weight)
    tuners.io.save_tuner(tuner, sys.argv[1], TunerMetadata.describe(tuner, "new"))
""")

TRAIN_AND_DIE_IN_CHECKPOINT = KILL_MID_WRITE + textwrap.dedent("""
    import torch
    from scedit_ui import cli

    real_save = torch.save
    dying_step = int(sys.argv[1])

    def save(state, path, *args, **kwargs):
        real_save(state, path, *args, **kwargs)
        if state["step"] == dying_step:
            cut_in_half_and_die(path)

    torch.save = save
    sys.exit(cli.main(sys.argv[2:]))
""")


def run_python(script: str, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *arguments], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def original_tuner(path: Path) -> dict[str, torch.Tensor]:
    tuner = SCTuner(LAYOUT, 1.0)
    save_tuner(tuner, path, TunerMetadata.describe(tuner, "original"))
    return {k: v.clone() for k, v in tuner.state_dict().items()}


def test_a_kill_while_saving_a_tuner_keeps_the_old_file_whole(tmp_path):
    library = TunerLibrary(tmp_path / "library", shipped=tmp_path / "shipped")
    target = library.root / "style.safetensors"
    before = original_tuner(target)

    killed = run_python(SAVE_TUNER_AND_DIE, str(target))

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [p.name for p in library.root.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".style.safetensors.") and leftovers[0].endswith(".tmp")
    tuner, metadata = load_tuner(target)
    assert metadata.base_architecture == "original"
    assert all(torch.equal(tuner.state_dict()[k], v) for k, v in before.items())
    assert library.names() == ["style"]  # the half-written temporary file is never listed as a tuner


def test_a_kill_during_the_first_save_leaves_no_tuner_at_all(tmp_path):
    library = TunerLibrary(tmp_path / "library", shipped=tmp_path / "shipped")
    killed = run_python(SAVE_TUNER_AND_DIE, str(library.root / "new.safetensors"))
    assert killed.returncode == -signal.SIGKILL
    assert library.names() == [] and not (library.root / "new.safetensors").exists()


def test_a_failed_import_keeps_the_library_as_it_was(tmp_path, monkeypatch):
    library = TunerLibrary(tmp_path / "library", shipped=tmp_path / "shipped")
    original_tuner(tmp_path / "incoming.safetensors")
    original_tuner(library.root / "kept.safetensors")

    def copy_half_then_fail(source, destination):
        Path(destination).write_bytes(Path(source).read_bytes()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", copy_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        library.import_file(tmp_path / "incoming.safetensors")
    assert sorted(p.name for p in library.root.iterdir()) == ["kept.safetensors"]  # no temporary file either
    assert library.names() == ["kept"]


def train_arguments(model: Path, tmp_path: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--kind", "sc", "--data", "shapes:stripes", "--steps", str(steps), "--batch", "1", "--checkpoint-every", "1",
            "--model", str(model), "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "style.safetensors"), *extra]


def steps_reported(stderr: str) -> list[int]:
    return [int(step) for step in re.findall(r"^step (\d+)/", stderr, flags=re.MULTILINE)]


def saved_step(tmp_path: Path) -> int:
    return torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=True)["step"]


def test_a_training_killed_while_writing_a_checkpoint_resumes_from_the_one_before(tmp_path, random_sd_folder, capsys):
    killed = run_python(TRAIN_AND_DIE_IN_CHECKPOINT, "3", *train_arguments(random_sd_folder, tmp_path, 5))

    assert killed.returncode == -signal.SIGKILL
    assert steps_reported(killed.stderr) == [1, 2]  # step 3 died inside its checkpoint write
    assert saved_step(tmp_path) == 2
    assert cli.main(train_arguments(random_sd_folder, tmp_path, 5, "--resume")) == 0
    assert steps_reported(capsys.readouterr().err) == [3, 4, 5]
    assert load_tuner(tmp_path / "style.safetensors")[1].training["steps"] == 5


def test_a_training_killed_at_any_step_resumes_without_losing_finished_steps(tmp_path, random_sd_folder, capsys):
    command = [sys.executable, "-u", "-m", "scedit_ui", *train_arguments(random_sd_folder, tmp_path, 1000)]
    training = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    reported = []
    try:
        deadline = time.monotonic() + 120
        while len(reported) < 3 and time.monotonic() < deadline:
            line = training.stderr.readline()
            if not line:
                break
            reported += steps_reported(line)
    finally:
        training.send_signal(signal.SIGKILL)
        training.wait(30)
        training.stderr.close()
    assert len(reported) >= 3 and training.returncode == -signal.SIGKILL

    saved = saved_step(tmp_path)
    assert saved >= reported[-1]  # a step is reported only after its checkpoint is on disk
    assert cli.main(train_arguments(random_sd_folder, tmp_path, saved + 2, "--resume")) == 0
    assert steps_reported(capsys.readouterr().err) == [saved + 1, saved + 2]


def test_a_resume_after_a_kill_before_the_first_checkpoint_starts_from_step_one(tmp_path, random_sd_folder, capsys):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # what such a kill leaves behind
    assert cli.main(train_arguments(random_sd_folder, tmp_path, 2, "--resume")) == 0
    assert steps_reported(capsys.readouterr().err) == [1, 2] and saved_step(tmp_path) == 2
