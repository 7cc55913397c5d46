"""Checkpoints that cannot lie: `resume_from_checkpoint=True` takes only a checkpoint whose save finished, whose files
say where it stands and are on disk; a save that an earlier run had completed loses its marker before it is
rewritten. Each fault is injected through `train()`."""

import logging
import os

import pytest
from test_faults import assert_same_weights, saving, trainer

from trl_bapo import checkpoint as checkpoint_module
from trl_bapo.checkpoint import COMPLETE_FILE


@pytest.fixture
def straight(tiny_model_path, tmp_path):
    run = trainer(tiny_model_path, tmp_path / "straight")
    run.train()
    return run


def resumed_from(model, output_dir, caplog, **overrides):
    """A run resumed with resume_from_checkpoint=True, and the warnings that name the checkpoints it skipped."""
    with caplog.at_level(logging.WARNING):
        resumed = saving(model, output_dir, **overrides)
        resumed.train(resume_from_checkpoint=True)
    return resumed, [r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage()]


@pytest.mark.parametrize("marked", [False, True], ids=["killed-mid-save", "marked-then-damaged"])
def test_an_unreadable_trainer_state_is_skipped_with_a_warning(tiny_model_path, tmp_path, straight, caplog, marked):
    """A save killed while transformers wrote trainer_state.json leaves it truncated (and the folder unmarked); found
    by review: resume_from_checkpoint=True crashed with a JSONDecodeError instead of taking checkpoint-2."""
    run = tmp_path / "run"
    saving(tiny_model_path, run).train()
    state = run / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    if not marked:
        (run / "checkpoint-4" / COMPLETE_FILE).unlink()
    resumed, skipped = resumed_from(tiny_model_path, run, caplog)
    reason = "cannot be read (JSONDecodeError" if marked else f"no {COMPLETE_FILE}"
    assert len(skipped) == 1 and "checkpoint-2, not from" in skipped[0] and reason in skipped[0], skipped
    assert_same_weights(resumed, straight)


def test_a_checkpoint_rewritten_by_a_second_run_is_not_complete_until_its_save_ends(
    tiny_model_path, tmp_path, monkeypatch, caplog
):
    """A second run saving into a folder an earlier run had completed, stopped half-way through checkpoint-4: found
    by review, the folder kept the first run's marker over a mix of both runs' files, and was resumed from."""
    run = tmp_path / "run"
    saving(tiny_model_path, run).train()
    write = checkpoint_module.write_state

    def stopped_at_checkpoint_4(path, state):
        if "checkpoint-4" in path:
            raise KeyboardInterrupt  # the job is stopped after the model files, before BAPO's state
        write(path, state)

    monkeypatch.setattr(checkpoint_module, "write_state", stopped_at_checkpoint_4)
    with pytest.raises(KeyboardInterrupt):
        saving(tiny_model_path, run, learning_rate=3e-2).train()
    monkeypatch.setattr(checkpoint_module, "write_state", write)
    assert not (run / "checkpoint-4" / COMPLETE_FILE).exists()
    resumed, skipped = resumed_from(tiny_model_path, run, caplog, learning_rate=3e-2)
    assert len(skipped) == 1 and "checkpoint-2, not from" in skipped[0] and "checkpoint-4" in skipped[0], skipped
    assert resumed.state.global_step == 4


def test_every_file_is_on_disk_before_the_marker_counts(tiny_model_path, tmp_path, monkeypatch):
    """fsync of every file of the checkpoint (the trainer's and BAPO's) and of its folder, then of the marker, before
    and after the marker gets its name."""
    flushed, events = set(), []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        flushed.add(os.path.realpath(os.readlink(f"/proc/self/fd/{descriptor}")))
        return fsync(descriptor)

    def recording_replace(source, target):
        if str(target).endswith(COMPLETE_FILE):
            folder = os.path.dirname(str(target))
            files = {os.path.realpath(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names}
            events.append((folder, files - {os.path.realpath(str(source))} - flushed, os.path.realpath(source)))
        return replace(source, target)

    monkeypatch.setattr(checkpoint_module.os, "fsync", recording_fsync)
    monkeypatch.setattr(checkpoint_module.os, "replace", recording_replace)
    saving(tiny_model_path, tmp_path / "run").train()
    assert [os.path.basename(folder) for folder, _, _ in events] == ["checkpoint-2", "checkpoint-4"]
    for folder, unflushed, marker in events:
        assert not unflushed, f"{folder}: not on disk when the marker was written: {sorted(unflushed)}"
        assert marker in flushed and os.path.realpath(folder) in flushed
