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


def test_save_total_limit_deletes_older_checkpoints_only_once_the_new_one_is_complete(
    tiny_model_path, tmp_path, monkeypatch, caplog
):
    """Found by review: transformers rotated checkpoints inside its save, before BAPO marked the new one complete;
    stopped while marking checkpoint-4, the run was left with no complete checkpoint at all."""
    run = tmp_path / "run"
    mark = checkpoint_module.mark_complete

    def stopped_while_marking_checkpoint_4(folder, *args):
        if folder.endswith("checkpoint-4"):
            raise KeyboardInterrupt
        mark(folder, *args)

    monkeypatch.setattr("trl_bapo.trainer.mark_complete", stopped_while_marking_checkpoint_4)
    with pytest.raises(KeyboardInterrupt):
        saving(tiny_model_path, run, save_total_limit=1).train()
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.setattr("trl_bapo.trainer.mark_complete", mark)
    resumed, skipped = resumed_from(tiny_model_path, run, caplog, save_total_limit=1)
    assert len(skipped) == 1 and "checkpoint-2, not from" in skipped[0], skipped
    assert resumed.state.global_step == 4 and sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4"]


def test_a_folder_rewritten_by_a_run_on_fewer_processes_keeps_no_state_file_of_the_earlier_run(
    tiny_model_path, tmp_path
):
    """Found by review: the marker went, but an earlier run's `bapo_state_1.pt` stayed beside this run's files, at the
    same step, for a later resume on two processes to read as its own."""
    run = tmp_path / "run"
    saving(tiny_model_path, run).train()
    stale = run / "checkpoint-2" / "bapo_state_1.pt"
    stale.write_bytes((run / "checkpoint-2" / "bapo_state_0.pt").read_bytes())
    saving(tiny_model_path, run, learning_rate=3e-2).train()
    assert not stale.exists() and (run / "checkpoint-2" / COMPLETE_FILE).exists()


@pytest.mark.parametrize("content", ["[]", '{"global_step": null}'])
def test_a_trainer_state_that_says_no_step_is_skipped(tiny_model_path, tmp_path, straight, caplog, content):
    """Found by review: valid JSON that is no trainer state counted as usable, and transformers then failed."""
    run = tmp_path / "run"
    saving(tiny_model_path, run).train()
    (run / "checkpoint-4" / "trainer_state.json").write_text(content)
    resumed, skipped = resumed_from(tiny_model_path, run, caplog)
    assert len(skipped) == 1 and "trainer_state.json holds no global_step" in skipped[0], skipped
    assert_same_weights(resumed, straight)
