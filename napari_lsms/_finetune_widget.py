"""The "Fine-tune LSMS" dock widget: train a new model version on the saved corrections.

The user picks the corrections dataset (written by the segment widget's "Save correction"), the
base model and a few training settings, and presses Start. Training runs in a subprocess
(:class:`~napari_lsms._training_process.TrainingProcess`) so napari stays responsive and a crash
cannot take it down; a timer polls its progress events into a progress bar, a status line and a
live plot of the training loss and validation Dice. When the run ends, the best model is evaluated
against the base model on the validation corrections (the ``val`` split: images never trained on,
but the same split that picked the best checkpoint and stopped the run early, so the "after" figure
is a model-selection metric and optimistic, not an independent test) and published under
``models_home()/models/<base>-ft-<timestamp>/`` (see :func:`~napari_lsms._training_process.publish_model`),
and every segment widget in the viewer refreshes its model picker. Earlier versions stay listed,
so rolling back is picking another model.

A running fine-tune is cancelled (stop file, then SIGTERM, then SIGKILL) when the widget leaves
the viewer: when its dock is closed (napari only un-parents the widget, it never closes it), when
the widget is deleted (with the viewer's window, for example) and when the application quits.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QPointF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_lsms._docking import left_its_dock
from napari_lsms._training_process import TEXT_TRAINABLE, TrainingProcess, publish_model

if TYPE_CHECKING:
    import napari

LOSS_COLOR = QColor(255, 160, 60)
DICE_COLOR = QColor(80, 200, 255)

#: Learning rates offered in the picker (fine-tuning wants small ones).
LEARNING_RATES = ("1e-5", "3e-5", "1e-4", "3e-4", "1e-3")


class TrainingPlot(QWidget):
    """A small live plot: training loss (left scale, orange) and validation Dice (0..1, blue)
    against the training step, drawn with QPainter."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.loss: list[tuple[float, float]] = []
        self.dice: list[tuple[float, float]] = []
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def clear(self) -> None:
        self.loss.clear()
        self.dice.clear()
        self.update()

    def add_loss(self, step: float, value: float) -> None:
        if math.isfinite(value):
            self.loss.append((float(step), float(value)))
            self.update()

    def add_dice(self, step: float, value: float) -> None:
        if math.isfinite(value):
            self.dice.append((float(step), float(value)))
            self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        metrics = painter.fontMetrics()
        text_h = metrics.height()
        left, right, top, bottom = 8, 8, text_h + 6, text_h + 6
        width = max(self.width() - left - right, 1)
        height = max(self.height() - top - bottom, 1)

        painter.setPen(QPen(self.palette().mid().color(), 1))
        painter.drawRect(left, top, width, height)

        steps = [s for s, _ in self.loss + self.dice]
        if not steps:
            painter.setPen(self.palette().text().color())
            painter.drawText(
                left, top, width, height, Qt.AlignmentFlag.AlignCenter, "loss and validation Dice"
            )
            return
        x0, x1 = min(steps), max(steps)
        x_span = (x1 - x0) or 1.0
        losses = [v for _, v in self.loss]
        y_lo, y_hi = (min(losses), max(losses)) if losses else (0.0, 1.0)
        y_span = (y_hi - y_lo) or 1.0

        def point(step: float, fraction: float) -> QPointF:
            return QPointF(left + (step - x0) / x_span * width, top + (1.0 - fraction) * height)

        for series, color, to_fraction in (
            (self.loss, LOSS_COLOR, lambda v: (v - y_lo) / y_span),
            (self.dice, DICE_COLOR, lambda v: min(max(v, 0.0), 1.0)),
        ):
            if not series:
                continue
            painter.setPen(QPen(color, 2))
            points = [point(s, to_fraction(v)) for s, v in series]
            if len(points) > 1:
                painter.drawPolyline(QPolygonF(points))
            if series is self.dice or len(points) == 1:  # few points: mark each one
                for p in points:
                    painter.drawEllipse(p, 2.5, 2.5)

        legend = []
        if self.loss:
            legend.append((LOSS_COLOR, f"loss {self.loss[-1][1]:.3g} (range {y_lo:.3g}-{y_hi:.3g})"))
        if self.dice:
            legend.append((DICE_COLOR, f"val Dice {self.dice[-1][1]:.3f}"))
        x = left
        for color, text in legend:
            painter.setPen(color)
            painter.drawText(x, text_h, text)
            x += metrics.horizontalAdvance(text) + 12
        painter.setPen(self.palette().text().color())
        painter.drawText(left, top + height + text_h, f"step {x0:g}")
        end_label = f"step {x1:g}"
        painter.drawText(left + width - metrics.horizontalAdvance(end_label), top + height + text_h, end_label)


class _RunHandle:
    """The widget's running training process, kept outside the widget so that a slot on the
    widget's ``destroyed`` signal (or on ``aboutToQuit``) can cancel it without touching the
    widget, which may be half-deleted by then."""

    __slots__ = ("process",)

    def __init__(self) -> None:
        self.process: TrainingProcess | None = None


def _cancel_run(handle: _RunHandle, *_signal_args) -> None:
    """Cancel ``handle``'s process, if any (a slot that holds no reference to the widget)."""
    process = handle.process
    if process is not None:
        process.cancel()


class FineTuneWidget(QWidget):
    """Dock widget that fine-tunes a model on the corrections dataset in a subprocess."""

    POLL_MS = 200

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._handle = _RunHandle()
        self.last_model: Path | None = None  # the model published by the last successful run
        self.publish_worker = None  # napari thread worker evaluating and saving the new model
        self._run: dict = {}

        from lsms_core.checkpoint import models_home

        self.data_edit = QLineEdit(str(models_home() / "corrections"))
        self.data_edit.editingFinished.connect(self.update_record_count)
        browse = QPushButton("…")
        browse.setToolTip("Choose the corrections dataset folder")
        browse.clicked.connect(self._browse_data)
        data_row = QHBoxLayout()
        data_row.addWidget(self.data_edit)
        data_row.addWidget(browse)
        self.records_label = QLabel()

        self.model_combo = QComboBox()
        self.model_combo.setToolTip("The model to start from (usually the one that made the masks)")
        refresh = QPushButton("↻")
        refresh.setToolTip("Reload the model list")
        refresh.clicked.connect(self.refresh_models)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(refresh)

        self.duration_unit = QComboBox()
        self.duration_unit.addItems(["epochs", "steps"])
        self.duration_unit.currentTextChanged.connect(self._on_unit_changed)
        self.duration = QSpinBox()
        self.duration.setRange(1, 100_000)
        self.duration.setValue(5)
        duration_row = QHBoxLayout()
        duration_row.addWidget(self.duration)
        duration_row.addWidget(self.duration_unit)

        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 256)
        self.batch_size.setValue(4)
        self.batch_size.setToolTip("Slices per training step (small batches suit few corrections)")

        self.lr_combo = QComboBox()
        self.lr_combo.setEditable(True)
        self.lr_combo.addItems(LEARNING_RATES)
        self.lr_combo.setCurrentText("1e-4")

        self.text_combo = QComboBox()
        for value, label in zip(TEXT_TRAINABLE, ("frozen", "last layers", "full")):
            self.text_combo.addItem(f"text encoder: {label}", value)
        self.text_combo.setToolTip(
            "Which parts train: the image model always; the text encoder is frozen by default "
            "(safest with few corrections), or its last layers, or fully"
        )

        form = QFormLayout()
        form.addRow("Corrections", data_row)
        form.addRow("", self.records_label)
        form.addRow("Base model", model_row)
        form.addRow("Train for", duration_row)
        form.addRow("Batch size", self.batch_size)
        form.addRow("Learning rate", self.lr_combo)
        form.addRow("Trains", self.text_combo)

        self.start_button = QPushButton("Start fine-tuning")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)
        self.plot = TrainingPlot()

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addStretch(1)

        self.timer = QTimer(self)
        self.timer.setInterval(self.POLL_MS)
        self.timer.timeout.connect(self._on_timer)

        # Stop a running fine-tune when the widget goes away. Closing the dock only un-parents the
        # widget (see event()) and closing the viewer deletes it without a closeEvent, so
        # closeEvent alone is not enough. These slots are closures over the process handle, never
        # bound methods of this widget, so they are safe to call while (or after) it is deleted.
        cancel_run = functools.partial(_cancel_run, self._handle)
        self.destroyed.connect(cancel_run)
        app = QApplication.instance()
        if app is not None:  # quitting napari stops a running fine-tune (cleanly, via the stop file)
            app.aboutToQuit.connect(cancel_run)

        self.refresh_models()
        self.update_record_count()

    @property
    def process(self) -> TrainingProcess | None:
        """The running training process (``None`` when idle)."""
        return self._handle.process

    @process.setter
    def process(self, value: TrainingProcess | None) -> None:
        self._handle.process = value

    # ------------------------------------------------------------------ pickers

    @property
    def data_dir(self) -> Path:
        return Path(self.data_edit.text().strip()).expanduser()

    def update_record_count(self) -> int:
        """Show (and return) the number of corrections in the chosen folder."""
        from lsms_core.data.corrections import CorrectionsDataset

        try:
            dataset = CorrectionsDataset(self.data_dir)
            count = len(dataset)
            splits = dataset.splits()
        except (OSError, ValueError) as err:
            self.records_label.setText(f"cannot read: {err}")
            return 0
        images = len(splits["train"]) + len(splits["val"])
        self.records_label.setText(
            f"{count} correction(s) on {images} image(s); {len(splits['val'])} image(s) held out for validation"
        )
        return count

    def refresh_models(self) -> None:
        """Reload the base-model picker from ``lsms_core.checkpoint.list_models()``.

        A model folder that cannot be listed (unreadable, no home folder...) leaves the picker
        empty and says why in the status line and a notification, instead of raising."""
        from napari.utils.notifications import show_error

        from lsms_core.checkpoint import list_models

        current = self.model_combo.currentData()
        try:
            entries = list_models()
        except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: Path.home() unknown
            entries = []
            message = f"Fine-tune: could not list the models: {err}"
            self.status.setText(message)
            show_error(message)
        self.model_combo.clear()
        for entry in entries:
            self.model_combo.addItem(entry.label, str(entry.path))
            self.model_combo.setItemData(self.model_combo.count() - 1, str(entry.path), Qt.ItemDataRole.ToolTipRole)
        index = self.model_combo.findData(current) if current else -1
        self.model_combo.setCurrentIndex(max(index, 0))

    def _browse_data(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Corrections dataset", str(self.data_dir))
        if folder:
            self.data_edit.setText(folder)
            self.update_record_count()

    def _on_unit_changed(self, unit: str) -> None:
        self.duration.setValue(5 if unit == "epochs" else 200)

    # ------------------------------------------------------------------ running

    @property
    def busy(self) -> bool:
        return self.process is not None or self.publish_worker is not None

    def start(self) -> TrainingProcess | None:
        """Validate the settings and launch the training subprocess; ``None`` when refused.

        Every refusal or failure to start is a notification and a status line, never an exception."""
        from napari.utils.notifications import show_error

        try:
            return self._start()
        except (OSError, ValueError, RuntimeError) as err:
            process, self.process = self.process, None
            if process is not None:  # started, then failed: do not leave it running unseen
                process.cancel(grace=0.0)
            self.timer.stop()
            self._set_running(False)
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            message = f"Fine-tune: could not start training: {err}"
            self.status.setText(message)
            show_error(message)
            return None

    def _start(self) -> TrainingProcess | None:
        from napari.utils.notifications import show_error

        if self.busy:
            return None
        base = self.model_combo.currentData()
        if not base:
            show_error("Fine-tune: no base model; train one with `lsms train` or add one to the model folder")
            return None
        if self.update_record_count() == 0:
            show_error(
                f"Fine-tune: no corrections in {self.data_dir}; correct some masks and press "
                "'Save correction' in the segment widget first"
            )
            return None
        try:
            lr = float(self.lr_combo.currentText())
            if not lr > 0:
                raise ValueError
        except ValueError:
            show_error(f"Fine-tune: learning rate {self.lr_combo.currentText()!r} is not a positive number")
            return None

        from lsms_core.checkpoint import models_home

        name = f"{base_model_name(Path(base))}-ft-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        home = models_home()
        run_dir = home / "runs" / name
        amount = {"epochs" if self.duration_unit.currentText() == "epochs" else "max_steps": self.duration.value()}
        run = {
            "name": name,
            "base": base,
            "data": self.data_dir,
            "run_dir": run_dir,
            "dest": home / "models" / name / "model.safetensors",
        }
        # The last thing that can fail: start() catches its errors (OSError, ValueError) with the rest.
        self.process = TrainingProcess(
            self.data_dir,
            base,
            run_dir,
            lr=lr,
            batch_size=self.batch_size.value(),
            text_trainable=self.text_combo.currentData(),
            **amount,
        )
        self._run = run
        self.plot.clear()
        self.progress.setRange(0, 0)  # busy until the first event says how many steps
        self._set_running(True)
        self.status.setText(f"Starting training of {name}…")
        self.timer.start()
        return self.process

    def cancel(self) -> None:
        """Stop the running training (cleanly via the stop file, then by signal)."""
        if self.process is not None:
            self.process.cancel()
            self.cancel_button.setEnabled(False)
            self.status.setText("Cancelling…")

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _on_timer(self) -> None:
        process = self.process
        if process is None:
            return
        # Read `finished` before draining: once it is true the readers have put their last event,
        # so this drain gets every event; checking it after the drain could lose the last ones.
        finished = process.finished
        for event in process.poll():
            self._handle_event(event)
        if finished:
            self._training_ended()

    def _handle_event(self, event: dict) -> None:
        kind = event.get("event")
        step, total = event.get("step"), event.get("total_steps")
        if isinstance(total, int) and total > 0:
            self.progress.setRange(0, total)
            if isinstance(step, int):
                self.progress.setValue(min(step, total))
        loss = event.get("loss")
        if kind == "step" and isinstance(loss, (int, float)) and step is not None:
            self.plot.add_loss(step, float(loss))
        dice = _dice_of(event.get("metrics"))
        if kind == "validation" and dice is not None and step is not None:
            self.plot.add_dice(step, dice)
        parts = [f"{kind}"]
        if step is not None:
            parts.append(f"step {step}/{total}" if total else f"step {step}")
        if event.get("epoch") is not None:
            parts.append(f"epoch {event['epoch']}")
        if isinstance(loss, (int, float)):
            parts.append(f"loss {loss:.4f}")
        if dice is not None:
            parts.append(f"val Dice {dice:.3f}")
        self.status.setText(" · ".join(parts))

    def _training_ended(self) -> None:
        from napari.utils.notifications import show_error, show_info

        process, self.process = self.process, None
        if process.cancelled:
            self.timer.stop()
            self._set_running(False)
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.status.setText("Fine-tuning cancelled; no new model was saved.")
            show_info("Fine-tuning cancelled")
            return
        if not process.succeeded:
            self.timer.stop()
            self._set_running(False)
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            tail = process.stderr_tail.strip() or "(no error output)"
            self.status.setText(f"Training failed (exit status {process.returncode}).")
            show_error(f"Fine-tune: training failed (exit status {process.returncode}):\n{tail[-2000:]}")
            return
        self.timer.stop()
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 0)
        self.status.setText("Training done; evaluating before/after on the validation corrections…")
        from napari.qt.threading import create_worker

        run = self._run
        worker = create_worker(
            publish_model,
            run["run_dir"] / "model.safetensors",
            run["dest"],
            base_model=run["base"],
            data=run["data"],
            version=run["name"],
            _ignore_errors=True,
        )
        worker.returned.connect(self._published)
        worker.errored.connect(self._publish_failed)
        worker.finished.connect(self._publish_finished)
        self.publish_worker = worker
        worker.start()

    def _published(self, path: Path) -> None:
        from napari.utils.notifications import show_info

        from lsms_core.checkpoint import read_model_card

        self.last_model = Path(path)
        summary = _before_after_text(read_model_card(path).get("metrics") or {})
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.status.setText(f"Saved {self._run['name']}. {summary}")
        show_info(f"LSMS: new model {self._run['name']} saved. {summary}")
        self.refresh_models()
        refresh_segment_widgets(self.viewer)

    def _publish_failed(self, err: BaseException) -> None:
        from napari.utils.notifications import show_error

        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status.setText(f"Saving the new model failed: {err}")
        show_error(f"Fine-tune: saving the new model failed: {err}")

    def _publish_finished(self) -> None:
        self.publish_worker = None
        self._set_running(False)

    def event(self, event) -> bool:
        """Cancel a running fine-tune when the widget leaves its dock: napari's
        ``remove_dock_widget`` (the dock's close button) only calls ``setParent(None)``."""
        if left_its_dock(self, event):
            self.cancel()
        return super().event(event)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self.cancel()
        super().closeEvent(event)


# ---------------------------------------------------------------------- helpers


def base_model_name(path: Path) -> str:
    """A short name for the model file ``path``: its stem, or its folder for ``.../NAME/model.safetensors``,
    without an earlier ``-ft-<timestamp>`` suffix (so names do not grow with each fine-tune)."""
    name = path.parent.name if path.stem == "model" else path.stem
    return re.sub(r"-ft-\d{8}-\d{6}$", "", name) or "model"


def refresh_segment_widgets(viewer) -> int:
    """Call ``refresh_models()`` on every docked widget of ``viewer`` that has it; return how many."""
    count = 0
    for widget in list(viewer.window.dock_widgets.values()):
        widget = getattr(widget, "native", widget)
        refresh = getattr(widget, "refresh_models", None)
        if callable(refresh) and not isinstance(widget, FineTuneWidget):
            refresh()
            count += 1
    return count


def _dice_of(metrics) -> float | None:
    """The Dice value in a metrics dict (an evaluation report's ``overall`` when there is one)."""
    if isinstance(metrics, dict) and isinstance(metrics.get("overall"), dict):
        metrics = metrics["overall"]
    if not isinstance(metrics, dict):
        return None
    for key in ("dice", "mdice", "mean_dice", "val_dice"):
        for name, value in metrics.items():
            if name.lower() == key and isinstance(value, (int, float)):
                return float(value)
    return None


def _before_after_text(metrics: dict) -> str:
    """One line comparing the base and the fine-tuned model on the validation corrections.

    The ``val`` split is never trained on, but it chose the best checkpoint and stopped the run
    early, so the "after" figure is a model-selection metric (optimistic), and the text says so."""
    before, after = _dice_of(metrics.get("before")), _dice_of(metrics.get("after"))
    if before is None or after is None:
        return "No validation image yet, so no before/after figures (correct a second image)."
    return (
        f"Validation Dice: {before:.3f} (before) → {after:.3f} (after); the validation images "
        "also chose the checkpoint, so 'after' is optimistic."
    )
