"""Fine-tuning from corrections: the training subprocess, publishing, and the dock widget.

Each training run is a real ``python -m lsms_core.cli train`` subprocess on a tiny model and a
corrections dataset of three records on two small images (one image is held out for validation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lsms_core.checkpoint import list_models, read_model_card, save_model
from lsms_core.data.corrections import CorrectionsDataset
from lsms_core.io import Volume
from napari_lsms._training_process import TrainingProcess, build_train_command, parse_event, publish_model


@pytest.fixture()
def lsms_home(tmp_path, monkeypatch):
    home = tmp_path / "lsms_home"
    monkeypatch.setenv("LSMS_HOME", str(home))  # inherited by the training subprocesses
    return home


@pytest.fixture()
def base_model(lsms_home, tiny_model) -> Path:
    return save_model(tiny_model, lsms_home / "models" / "tiny-base.safetensors", version="base-1")


def _ct_with_lesion(seed: int, shape=(4, 40, 40)) -> tuple[Volume, np.ndarray]:
    """Soft tissue (~50 HU) with a dark round lesion (~-20 HU) and mild noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    cy, cx, r = 14 + 4 * seed, 18 + 3 * seed, 6
    lesion = ((y - cy) ** 2 + (x - cx) ** 2 <= r * r) & (z >= 1) & (z <= 2)
    hu = np.where(lesion, -20.0, 50.0) + rng.normal(0, 8, shape)
    return Volume(hu.astype(np.int16), spacing=(1.0, 1.0, 3.0)), lesion.astype(np.uint8)


@pytest.fixture()
def corrections(lsms_home) -> CorrectionsDataset:
    dataset = CorrectionsDataset(lsms_home / "corrections")
    for seed, text in ((0, "the dark lesion"), (1, "the hypodense lesion"), (0, "the round lesion")):
        image, lesion = _ct_with_lesion(seed)
        model_mask = np.zeros_like(lesion)
        model_mask[1, 5:10, 5:10] = 1  # a wrong guess the user corrected
        dataset.add(image, text, model_mask, lesion, model_version="base-1")
    assert dataset.splits()["val"] and dataset.splits()["train"]
    return dataset


def _collect_errors(monkeypatch) -> list[str]:
    """Record the messages of napari error notifications shown by the widget."""
    import napari.utils.notifications as notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", lambda message: shown.append(str(message)))
    return shown


# ---------------------------------------------------------------------------- no subprocess


def test_build_train_command_and_parse_event(tmp_path):
    command = build_train_command("D", "M.safetensors", tmp_path, max_steps=7, lr=3e-4, text_trainable="last_k")
    assert command[1:4] == ["-m", "lsms_core.cli", "train"]
    joined = " ".join(command)
    for part in ("--data D", "--init-from M.safetensors", "--max-steps 7", "--lr 0.0003",
                 "--text-trainable last_k", "--json-progress", f"--out {tmp_path}"):  # fmt: skip
        assert part in joined
    assert "--epochs" not in command
    with pytest.raises(ValueError, match="text_trainable"):
        build_train_command("D", None, tmp_path, epochs=1, text_trainable="some")
    with pytest.raises(ValueError, match="epochs or max_steps"):
        build_train_command("D", None, tmp_path)

    assert parse_event('{"event": "step", "step": 3, "loss": 0.5}\n') == {"event": "step", "step": 3, "loss": 0.5}
    assert parse_event("Loading weights...\n") is None
    assert parse_event('{"no_event": 1}') is None
    assert parse_event("{broken") is None


# ---------------------------------------------------------------------------- subprocess


def test_training_process_runs_and_streams_events(base_model, corrections, tmp_path):
    run = tmp_path / "run"
    process = TrainingProcess(corrections.root, base_model, run, max_steps=2, lr=1e-3, batch_size=2)
    assert process.wait(timeout=180) == 0, process.stderr_tail
    events = process.poll()
    kinds = [event["event"] for event in events]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds
    steps = [event for event in events if event["event"] == "step"]
    assert [event["step"] for event in steps] == [1, 2]
    assert all(np.isfinite(event["loss"]) and event["total_steps"] == 2 for event in steps)
    assert "validation" in kinds
    assert process.succeeded and process.finished and process.poll() == []
    assert read_model_card(run / "model.safetensors")["format"] == "lsms-model"

    taken = tmp_path / "published" / "model.safetensors"
    taken.parent.mkdir()
    taken.write_bytes(b"an earlier version")
    with pytest.raises(ValueError, match="never overwritten"):
        publish_model(run / "model.safetensors", taken, base_model=base_model, data=corrections.root)
    assert taken.read_bytes() == b"an earlier version"


def test_training_process_failure_keeps_stderr(base_model, tmp_path):
    process = TrainingProcess(tmp_path / "no-such-dataset", base_model, tmp_path / "run", max_steps=2)
    assert process.wait(timeout=120) != 0
    assert not process.succeeded
    assert "no-such-dataset" in process.stderr_tail


def test_training_process_cancel_by_signal(base_model, corrections, tmp_path):
    """Without a grace period the process group gets SIGTERM at once (the stop file is the polite
    path, tested through the widget)."""
    process = TrainingProcess(corrections.root, base_model, tmp_path / "run", max_steps=100_000)
    process.cancel(grace=0.0, kill_after=20.0)
    process.wait(timeout=60)
    assert process.returncode is not None and process.returncode != 0
    assert process.cancelled and not process.succeeded
    assert (tmp_path / "run" / "STOP").exists()


# ---------------------------------------------------------------------------- widget


def test_widget_fine_tunes_and_new_version_is_selectable(
    make_napari_viewer, qtbot, base_model, corrections, lsms_home, monkeypatch
):
    from napari_lsms._finetune_widget import FineTuneWidget
    from napari_lsms._widget import SegmentWidget

    errors = _collect_errors(monkeypatch)
    viewer = make_napari_viewer()
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment lesion")
    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")

    assert widget.data_dir == lsms_home / "corrections"
    assert widget.records_label.text().startswith("3 correction")
    assert Path(widget.model_combo.currentData()).resolve() == base_model.resolve()
    segment_models = [segment.model_combo.itemData(i) for i in range(segment.model_combo.count())]

    widget.duration_unit.setCurrentText("steps")
    widget.duration.setValue(2)
    widget.batch_size.setValue(2)
    widget.lr_combo.setCurrentText("1e-3")
    process = widget.start()
    assert process is not None and "--batch-size" in process.command
    assert not widget.start_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.busy, timeout=180_000)

    assert errors == [] and process.returncode == 0
    new = widget.last_model
    assert new is not None and new.is_file() and new.name == "model.safetensors"
    assert new.parent.parent == lsms_home / "models" and new.parent.name.startswith("tiny-base-ft-")
    card = read_model_card(new)
    assert card["extra"]["base_model"] == str(base_model) and card["version"] == new.parent.name
    for when in ("before", "after"):  # both models scored on the held-out image's corrections
        assert card["metrics"][when]["split"] == "val" and card["metrics"][when]["items"] > 0
        assert 0.0 <= card["metrics"][when]["dice"] <= 1.0
    assert card["metrics"]["before"]["model"] == str(base_model)
    assert card["metrics"]["after"]["model"] != str(base_model)  # the trained weights, not the base twice
    from lsms_core.evaluate import evaluate_path

    for when, path in (("before", base_model), ("after", new)):  # the published copy scores the same
        expected = evaluate_path(path, lsms_home / "corrections", "val", device="cpu")["overall"]
        numbers = {k: v for k, v in expected.items() if isinstance(v, float)}
        assert numbers and {k: card["metrics"][when][k] for k in numbers} == pytest.approx(numbers)
    assert {new.resolve(), base_model.resolve()} <= {Path(e.path).resolve() for e in list_models()}
    assert widget.progress.value() == widget.progress.maximum() == 1
    assert [step for step, _ in widget.plot.loss] == [1, 2] and widget.plot.dice
    assert "Saved" in widget.status.text()
    assert widget.start_button.isEnabled() and not widget.cancel_button.isEnabled()

    # The segment widget's picker now offers the new version, and still the old one (rollback).
    offered = [segment.model_combo.itemData(i) for i in range(segment.model_combo.count())]
    assert str(new.resolve()) in offered and str(new.resolve()) not in segment_models
    assert str(base_model.resolve()) in offered
    assert segment.select_model(base_model) and segment.select_model(new)
    # The plot renders with data (paintEvent runs without errors).
    assert not widget.plot.grab().isNull()


def test_widget_cancel_stops_the_run(make_napari_viewer, qtbot, base_model, corrections, lsms_home, monkeypatch):
    from napari_lsms._finetune_widget import FineTuneWidget

    errors = _collect_errors(monkeypatch)
    widget = FineTuneWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    widget.duration_unit.setCurrentText("steps")
    widget.duration.setValue(100_000)
    widget.batch_size.setValue(1)
    process = widget.start()
    qtbot.waitUntil(lambda: len(widget.plot.loss) >= 1, timeout=120_000)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)

    assert process.returncode is not None and process.cancelled
    assert "cancelled" in widget.status.text().lower() and errors == []
    assert widget.last_model is None
    assert not (lsms_home / "models").exists() or not list((lsms_home / "models").glob("*-ft-*"))
    assert widget.start_button.isEnabled()


def test_widget_reports_errors_and_keeps_working(
    make_napari_viewer, qtbot, base_model, corrections, lsms_home, tmp_path, monkeypatch
):
    from napari_lsms._finetune_widget import FineTuneWidget

    errors = _collect_errors(monkeypatch)
    viewer = make_napari_viewer()
    widget = FineTuneWidget(viewer)
    qtbot.addWidget(widget)

    widget.data_edit.setText(str(tmp_path / "empty"))
    assert widget.start() is None and widget.process is None
    assert "no corrections" in errors[-1]

    widget.data_edit.setText(str(corrections.root))
    widget.lr_combo.setCurrentText("fast")
    assert widget.start() is None and "learning rate" in errors[-1]

    # A damaged base model (valid card, garbage weights): the training subprocess crashes and
    # the notification shows its error output.
    broken = lsms_home / "models" / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    broken.with_suffix(".json").write_bytes(base_model.with_suffix(".json").read_bytes())
    widget.refresh_models()
    widget.model_combo.setCurrentIndex(widget.model_combo.findData(str(broken)))
    widget.lr_combo.setCurrentText("1e-4")
    widget.duration_unit.setCurrentText("steps")
    widget.duration.setValue(2)
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert "training failed" in errors[-1] and "broken.safetensors" in errors[-1]
    assert widget.last_model is None and widget.start_button.isEnabled()
    viewer.add_image(np.zeros((8, 8), np.float32))  # the viewer keeps working
    assert len(viewer.layers) == 1


# ---------------------------------------------------------------------------- widget lifecycle


class _StubProcess:
    """Stands in for a TrainingProcess: a queue of events, a ``finished`` flag, a cancel count."""

    def __init__(self, events=(), late_event=None):
        import queue

        self._events = queue.Queue()
        for event in events:
            self._events.put(event)
        self.late_event = late_event  # put when `finished` is first read: the readers' last event
        self._finished = False
        self.cancelled = True  # take the "cancelled" branch of _training_ended (no publishing)
        self.cancel_calls = 0

    @property
    def finished(self):
        if not self._finished and self.late_event is not None:
            self._events.put(self.late_event)  # arrives between the drain and the check
        self._finished = True
        return True

    def poll(self):
        events = []
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events

    def cancel(self, *args, **kwargs):
        self.cancel_calls += 1


def _start_long_run(widget, qtbot):
    widget.duration_unit.setCurrentText("steps")
    widget.duration.setValue(100_000)
    widget.batch_size.setValue(1)
    process = widget.start()
    assert process is not None
    # The trainer is up (it deletes stale STOP files before its "start" event).
    qtbot.waitUntil(lambda: process.last_event is not None, timeout=120_000)
    assert process.running
    return process


def test_closing_the_dock_or_the_viewer_cancels_training(
    make_napari_viewer, qtbot, base_model, corrections, lsms_home, monkeypatch
):
    """napari's dock close button (remove_dock_widget) only un-parents the widget, and closing the
    viewer deletes it without a closeEvent: both must still stop the training subprocess."""
    from napari_lsms._finetune_widget import FineTuneWidget

    errors = _collect_errors(monkeypatch)
    viewer = make_napari_viewer()
    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    process = _start_long_run(widget, qtbot)

    viewer.window.remove_dock_widget(widget)  # what the dock's "x" does
    assert process.cancelled
    qtbot.waitUntil(lambda: process.returncode is not None, timeout=60_000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=10_000)
    assert "cancelled" in widget.status.text().lower()

    # Reopened in a viewer that is then closed (without quitting the app): the run stops too.
    reopened = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(reopened, name="Fine-tune again")
    second = _start_long_run(reopened, qtbot)
    viewer.close()
    qtbot.waitUntil(lambda: second.returncode is not None, timeout=60_000)
    assert second.cancelled and not second.succeeded and errors == []
    assert not (lsms_home / "models").exists() or not list((lsms_home / "models").glob("*-ft-*"))


def test_deleting_the_widget_cancels_its_run(make_napari_viewer, qtbot):
    """The ``destroyed`` hook (a closure over the process handle) cancels a run of a widget that
    was never docked, and a widget without a run is deleted quietly."""
    from napari_lsms._finetune_widget import FineTuneWidget

    viewer = make_napari_viewer()
    widget = FineTuneWidget(viewer)
    stub = _StubProcess()
    widget.process = stub
    gone = []
    widget.destroyed.connect(lambda *_: gone.append(True))
    widget.deleteLater()
    qtbot.waitUntil(lambda: gone == [True], timeout=5_000)
    assert stub.cancel_calls == 1

    idle = FineTuneWidget(viewer)
    idle.destroyed.connect(lambda *_: gone.append(True))
    idle.deleteLater()
    qtbot.waitUntil(lambda: len(gone) == 2, timeout=5_000)  # no run: nothing to cancel, no error


def test_timer_keeps_the_last_events(make_napari_viewer, qtbot, monkeypatch):
    """An event that arrives after a drain of the queue but before `finished` is seen is shown."""
    import napari.utils.notifications as notifications

    from napari_lsms._finetune_widget import FineTuneWidget

    monkeypatch.setattr(notifications, "show_info", lambda message: None)
    widget = FineTuneWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    step = {"event": "step", "step": 1, "total_steps": 2, "loss": 0.9}
    last = {"event": "step", "step": 2, "total_steps": 2, "loss": 0.4}
    widget.process = _StubProcess([step], late_event=last)
    widget._set_running(True)
    widget._on_timer()
    assert widget.process is None  # the run ended in this tick...
    assert [s for s, _ in widget.plot.loss] == [1, 2]  # ...with its last event handled


def test_widget_reports_unexpected_errors_in_refresh_and_start(
    make_napari_viewer, qtbot, base_model, corrections, lsms_home, monkeypatch
):
    import lsms_core.checkpoint as checkpoint
    from napari_lsms._finetune_widget import FineTuneWidget

    errors = _collect_errors(monkeypatch)
    real_list_models = checkpoint.list_models

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(lsms_home / "models"))

    monkeypatch.setattr(checkpoint, "list_models", unreadable)
    widget = FineTuneWidget(make_napari_viewer())  # refresh_models() runs in __init__
    qtbot.addWidget(widget)
    assert "could not list the models" in errors[-1] and "Permission denied" in errors[-1]
    assert "could not list the models" in widget.status.text()
    assert widget.model_combo.count() == 0
    assert widget.start() is None and "no base model" in errors[-1]

    monkeypatch.setattr(checkpoint, "list_models", real_list_models)
    widget.refresh_models()
    assert Path(widget.model_combo.currentData()).resolve() == base_model.resolve()

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(checkpoint, "models_home", no_home)
    assert widget.start() is None and widget.process is None and not widget.busy
    assert "could not start training" in errors[-1] and "home directory" in errors[-1]
    assert "home directory" in widget.status.text()
    assert widget.start_button.isEnabled() and not widget.cancel_button.isEnabled()
