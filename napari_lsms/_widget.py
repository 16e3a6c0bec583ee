"""The segment widget: describe a lesion in words, get its mask in a Labels layer.

``SegmentWidget`` is a thin Qt client of ``lsms_core``: it collects the inputs, runs
:meth:`lsms_core.infer.Segmenter.segment` in a napari worker thread (progress in napari's activity
dock, Cancel checked between batches) and merges the result into a Labels layer drawn over the
image. The bookkeeping that does not need Qt lives in plain classes and functions that are tested
on their own:

- :class:`LabelBook` gives each description its own label id and builds the layer's ``features``;
- :class:`RecentDescriptions` remembers descriptions across sessions (a small JSON file);
- :class:`SegmenterCache` loads each (model, device) once;
- :func:`merge_mask` writes a result into a label map;
- :func:`same_geometry` decides whether a Labels layer is drawn on an image's voxel grid.

A result Labels layer is linked to its image by the image layer's unique id (``lsms_image_id``
in the Labels metadata) *and* by geometry, so a result never lands on another patient's layer
that merely has the same name and shape. Closing (destroying) the widget cancels a running job
and disconnects it from the viewer.

torch and transformers are imported only when a model is listed or loaded.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils import notifications
from qtpy.QtCore import QObject, QStringListModel, Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QCompleter,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMenu,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from lsms_core.infer import DEFAULT_SCALES
from lsms_core.intensity import WINDOW_PRESETS, level_width_to_range
from napari_lsms._docking import left_its_dock
from napari_lsms._reader import EXPRESSIONS_KEY, GEOMETRY_KEY, volume_for_layer_data

if TYPE_CHECKING:
    import napari

LABELS_NAME = "LSMS lesions"
#: Metadata key naming the image a result Labels layer was segmented on (informative only).
SOURCE_IMAGE_KEY = "lsms_image"
#: Metadata key linking a result Labels layer to its image: the image layer's ``unique_id``.
SOURCE_IMAGE_ID_KEY = "lsms_image_id"
SCOPES = ("all slices", "current slice", "slice range")
FEATURE_COLUMNS = ("index", "label", "description", "model_version", "time", "voxels", "volume_ml", "found")


class UserInputError(ValueError):
    """A problem with what the user chose; shown as a warning notification, never raised to Qt."""


# ---------------------------------------------------------------------------------------------
# Qt-free logic
# ---------------------------------------------------------------------------------------------


def normalize_description(text: str) -> str:
    """Collapse whitespace; the key used to recognise "the same description" ignores case too."""
    return " ".join(str(text).split())


class LabelBook:
    """One label id per description, and the Labels layer's ``features`` table.

    Rows are keyed by label id. Re-running a description (same words, ignoring case and spacing)
    reuses its id; a new description gets the next id above every id in use (also ids painted by
    hand, passed as ``taken``). The ``index`` column mirrors ``label`` so that napari shows the
    description when the mouse is over a label.
    """

    def __init__(self, features: Any = None):
        self._rows: dict[int, dict] = {}
        if features is not None and len(features) and {"label", "description"} <= set(features.columns):
            for row in features.to_dict("records"):
                self._rows[int(row["label"])] = {c: row.get(c) for c in FEATURE_COLUMNS}

    @staticmethod
    def _key(description: str) -> str:
        return normalize_description(description).casefold()

    def label_of(self, description: str) -> int | None:
        """The id already given to ``description``, or None."""
        key = self._key(description)
        for label, row in self._rows.items():
            if self._key(row["description"]) == key:
                return label
        return None

    def description_of(self, label: int) -> str | None:
        row = self._rows.get(int(label))
        return None if row is None else row["description"]

    def label_for(self, description: str, taken: Iterable[int] = ()) -> int:
        """The id of ``description``: its existing one, else the next free one."""
        label = self.label_of(description)
        if label is not None:
            return label
        return max([0, *self._rows, *(int(t) for t in taken)]) + 1

    def record(
        self,
        description: str,
        label: int,
        *,
        model_version: str,
        voxels: int,
        volume_ml: float,
        found: bool,
        time: str | None = None,
    ) -> dict:
        """Add or replace the row of ``label`` and return it."""
        row = {
            "index": int(label),
            "label": int(label),
            "description": normalize_description(description),
            "model_version": str(model_version),
            "time": time or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "voxels": int(voxels),
            "volume_ml": float(volume_ml),
            "found": bool(found),
        }
        self._rows[int(label)] = row
        return row

    def to_features(self):
        """The rows as a pandas DataFrame sorted by label, ready for ``Labels.features``."""
        import pandas as pd

        rows = [self._rows[label] for label in sorted(self._rows)]
        return pd.DataFrame(rows, columns=list(FEATURE_COLUMNS))

    def __len__(self) -> int:
        return len(self._rows)


def merge_mask(
    labels: np.ndarray, mask: np.ndarray, label: int, slices: tuple[int, int] | None = None
) -> int:
    """Write ``mask`` into ``labels`` as ``label`` (in place) and return the voxel count.

    Within the segmented slices ``[z0, z1)`` the previous voxels of ``label`` are cleared first, so
    a re-run replaces its old result; other labels are overwritten only where the new mask is.
    """
    if labels.shape != mask.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the labels shape {labels.shape}")
    z0, z1 = slices if slices is not None else (0, labels.shape[0])
    region = labels[z0:z1]
    region[region == label] = 0
    region[mask[z0:z1] > 0] = label
    return int(np.count_nonzero(labels == label))


def same_geometry(image: Any, labels: Any, atol: float = 1e-4) -> bool:
    """True when ``labels`` lies on ``image``'s voxel grid: same shape, same on-screen transform
    (``scale``, ``translate``, ``rotate``) and the same file geometry (spacing, origin, direction in
    the ``lsms_volume`` metadata; both must have it or both lack it, i.e. both guessed)."""
    if tuple(np.shape(labels.data)) != tuple(np.shape(image.data)):
        return False
    for attribute in ("scale", "translate", "rotate"):
        a, b = np.asarray(getattr(image, attribute), float), np.asarray(getattr(labels, attribute), float)
        if a.shape != b.shape or not np.allclose(a, b, atol=atol):
            return False
    mine, theirs = (layer.metadata.get(GEOMETRY_KEY) for layer in (image, labels))
    if bool(mine) != bool(theirs):
        return False
    if mine:
        for key in ("spacing", "origin", "direction"):
            a, b = np.asarray(mine.get(key, ()), float), np.asarray(theirs.get(key, ()), float)
            if a.shape != b.shape or not np.allclose(a, b, atol=atol):
                return False
    return True


def slider_to_data_slice(layer: Any, number: int) -> int:
    """The data slice (first axis) that napari's slider shows as ``number`` for ``layer``.

    napari numbers slices in display order, from the lowest world position up. A layer displayed
    flipped along its slice axis (a scan stored head to foot, drawn with a flipping ``rotate``)
    therefore counts its data slices backwards; the widget's slice boxes use the slider's numbers.
    """
    depth = layer.data.shape[0]
    origin = np.zeros(layer.ndim)
    step = origin.copy()
    step[0] = 1.0
    backwards = layer.data_to_world(step)[0] < layer.data_to_world(origin)[0]
    return depth - 1 - number if backwards else number


def voxel_volume_ml(spacing: Iterable[float]) -> float:
    """Volume of one voxel in millilitres for a spacing in millimetres."""
    return float(np.prod([float(s) for s in spacing])) / 1000.0


class RecentDescriptions:
    """Most recent first, de-duplicated, at most ``limit`` descriptions, kept in a JSON file."""

    def __init__(self, path: str | Path, limit: int = 20):
        self.path = Path(path)
        self.limit = limit
        self.items: list[str] = self._load()

    def _load(self) -> list[str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            warnings.warn(f"ignoring unreadable recent descriptions {self.path}: {exc}", stacklevel=2)
            return []
        items = data.get("descriptions", []) if isinstance(data, dict) else []
        return [normalize_description(t) for t in items if isinstance(t, str) and t.strip()][: self.limit]

    def add(self, description: str, save: bool = True) -> None:
        """Move ``description`` to the front, and save unless ``save`` is False."""
        text = normalize_description(description)
        key = text.casefold()
        self.items = [text] + [t for t in self.items if t.casefold() != key]
        del self.items[self.limit :]
        if save:
            self.save()

    def save(self) -> None:
        """Write the list atomically (fsync: call it off the GUI thread); a failure only warns."""
        from lsms_core._atomic import atomic_write_json

        try:
            atomic_write_json(self.path, {"descriptions": self.items})
        except OSError as exc:
            warnings.warn(f"could not save recent descriptions to {self.path}: {exc}", stacklevel=2)


class SegmenterCache:
    """Loads a :class:`lsms_core.infer.Segmenter` once per (model file, device); thread safe.

    The key includes the file's modification time, so a model file replaced on disk is reloaded.
    Only the ``max_models`` most recently used are kept (each holds a text encoder in memory).
    """

    def __init__(self, batch_size: int = 8, max_models: int = 2):
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.batch_size = batch_size
        self.max_models = max_models
        self._segmenters: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_path: str | Path, device: str = "auto"):
        from lsms_core.infer import Segmenter

        path = Path(model_path).resolve()
        key = (str(path), path.stat().st_mtime_ns if path.exists() else None, device)
        with self._lock:
            if key not in self._segmenters:
                self._segmenters[key] = Segmenter(path, device=device, batch_size=self.batch_size)
                while len(self._segmenters) > self.max_models:
                    self._segmenters.popitem(last=False)  # the least recently used
            self._segmenters.move_to_end(key)
            return self._segmenters[key]

    def __len__(self) -> int:
        return len(self._segmenters)


def image_problem(layer: Any) -> str | None:
    """Why ``layer`` cannot be segmented, or None when it is a 3D grayscale Image layer."""
    if layer is None:
        return "no image layer: open a CT (File > Open, or File > Open Sample > LSMS sample) first"
    if not isinstance(layer, Image):
        return f"layer {layer.name!r} is not an Image layer; choose a CT image"
    if layer.rgb:
        return f"image {layer.name!r} is RGB; LSMS needs a grayscale CT volume in Hounsfield units"
    if layer.ndim != 3:
        return (
            f"image {layer.name!r} has {layer.ndim} dimensions {tuple(layer.data.shape)}; LSMS needs a "
            "3D CT volume (z, y, x)"
        )
    if layer.multiscale:
        return f"image {layer.name!r} is multiscale; open the CT as a single-resolution volume"
    return None


class LayerVolume:
    """An image layer's array and geometry, taken on the GUI thread; :meth:`load` builds the
    :class:`lsms_core.io.Volume` (once) in a worker, so a lazily loaded (e.g. dask) image is read off
    the GUI thread."""

    def __init__(self, layer: Image):
        self._data = layer.data
        self._geometry = (dict(layer.metadata), tuple(layer.scale), tuple(layer.translate))
        self._volume = None

    def load(self):
        if self._volume is None:
            self._volume, _ = volume_for_layer_data(self._data, *self._geometry)
        return self._volume


@dataclass
class SegmentRequest:
    """Everything a segmentation job needs, gathered on the GUI thread (the CT only as a
    :class:`LayerVolume`, read in the job)."""

    image: Image
    description: str
    model_path: str
    model_version: str
    device: str
    slices: tuple[int, int] | None
    volume: LayerVolume
    scales: tuple[float, ...]


@dataclass
class LastResult:
    """The last result merged into a Labels layer, kept for "Save correction".

    Also a "not found" result: its ``model_mask`` is empty and ``label`` is the id the user paints
    the missed lesion with. ``slices`` is the segmented (reviewed) range, ``(z0, z1)`` input
    slices with ``z1`` exclusive, None for all slices.
    """

    image: Image
    labels: Labels
    description: str
    label: int
    model_mask: np.ndarray
    model_version: str
    slices: tuple[int, int] | None = None
    found: bool = True


class _Lifetime:
    """What the widget's ``destroyed`` handler needs, without a strong reference to the widget
    (Qt calls it while the C++ widget is going away: only Python objects may be touched)."""

    def __init__(self, widget: SegmentWidget, cancel: threading.Event):
        self.cancel = cancel
        self.closed = threading.Event()
        self.widget = weakref.ref(widget)

    def teardown(self, *_args) -> None:
        self.closed.set()
        self.cancel.set()  # a running job stops after its current batch
        widget = self.widget()
        if widget is not None:
            widget._disconnect_viewer()


def _guarded(method):
    """Qt slot wrapper: user errors become warnings, anything else an error notification."""

    @functools.wraps(method)
    def slot(self, *_signal_args):
        try:
            return method(self)
        except UserInputError as exc:
            notifications.show_warning(f"LSMS: {exc}")
        except Exception as exc:  # noqa: BLE001 - never let an exception escape into Qt's event loop
            notifications.show_error(f"LSMS: {type(exc).__name__}: {exc}")
        return None

    return slot


class _ProgressRelay(QObject):
    """Carries the Segmenter's progress callback (worker thread) to the GUI thread."""

    progress = Signal(int, int)


# ---------------------------------------------------------------------------------------------
# The widget
# ---------------------------------------------------------------------------------------------


class SegmentWidget(QWidget):
    """Dock widget: image, description, model, device, scope, CT window; Segment/Cancel; corrections."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.segmenters = SegmenterCache()
        self.worker = None  # the running napari worker, if any
        self.last_result: LastResult | None = None
        self._cancel = threading.Event()
        self._lifetime = _Lifetime(self, self._cancel)
        self._relay = _ProgressRelay()
        self._relay.progress.connect(self._on_progress)
        self._pbar = None
        self._image_ref = None  # weak reference to the image whose slice range the spin boxes hold
        self._named_layers: weakref.WeakSet = weakref.WeakSet()  # layers whose renames we follow
        self._count_token = object()  # identifies the newest corrections count; older ones are dropped
        self.recent = RecentDescriptions(self._home() / "recent_descriptions.json")

        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.viewer.layers.events.reordered.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            self._follow_name(layer)
        # Not a method of the widget: PyQt drops the slots of the object being destroyed.
        self.destroyed.connect(functools.partial(_Lifetime.teardown, self._lifetime))
        self._refresh_images()
        self._on_image_changed()
        self.refresh_models()
        self._refresh_devices()
        self._refresh_corrections_count()

    # -- construction ------------------------------------------------------------------------

    def _build_ui(self) -> None:
        self.image_combo = QComboBox()
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)

        self.description_edit = QLineEdit()
        self.description_edit.setPlaceholderText("e.g. the largest hypodense lesion in the right lobe")
        self.description_edit.returnPressed.connect(self.segment)
        self._completion_model = QStringListModel()
        completer = QCompleter(self._completion_model, self)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        completer.setFilterMode(Qt.MatchFlag.MatchContains)
        self.description_edit.setCompleter(completer)
        self.suggestions_button = QToolButton()
        self.suggestions_button.setText("▾")
        self.suggestions_button.setToolTip("Recent descriptions and the sample's expressions")
        self.suggestions_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.suggestions_menu = QMenu(self.suggestions_button)
        self.suggestions_button.setMenu(self.suggestions_menu)

        self.model_combo = QComboBox()
        self.model_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_combo.setMinimumContentsLength(18)
        refresh_button = QToolButton()
        refresh_button.setText("↻")
        refresh_button.setToolTip("Refresh the list of models")
        refresh_button.clicked.connect(self.refresh_models)
        self.device_combo = QComboBox()

        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.scope_combo.currentTextChanged.connect(self._on_scope_changed)
        self.first_slice = QSpinBox()
        self.last_slice = QSpinBox()
        for spin in (self.first_slice, self.last_slice):
            spin.setEnabled(False)
            spin.setToolTip("Numbered like napari's slice slider (inclusive)")

        extra = ", ".join(f"{scale:g}x" for scale in DEFAULT_SCALES[1:])
        self.multiscale_check = QCheckBox(f"also at {extra} (a little more accurate)")
        self.multiscale_check.setToolTip(
            f"Average the model's answers at the CT's own input size and at {extra}, the extra pass "
            "only on slices not confidently empty (the default). Untick for one pass, about 1.75x "
            "faster. Measured figures: docs/benchmarks.md (multi-scale inference)"
        )
        self.multiscale_check.setChecked(len(DEFAULT_SCALES) > 1)

        self.window_combo = QComboBox()
        self.window_combo.addItems(list(WINDOW_PRESETS))
        self.window_combo.setToolTip("Display contrast only; the model always sees its own HU window")
        self.window_combo.currentTextChanged.connect(self._on_window_changed)

        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Description", _row(self.description_edit, self.suggestions_button))
        form.addRow("Model", _row(self.model_combo, refresh_button))
        form.addRow("Device", self.device_combo)
        form.addRow("Scope", self.scope_combo)
        form.addRow("Slices", _row(self.first_slice, QLabel("to"), self.last_slice))
        form.addRow("Scales", self.multiscale_check)
        form.addRow("CT window", self.window_combo)

        self.corrections_edit = QLineEdit(str(self._home() / "corrections"))
        self.corrections_edit.editingFinished.connect(self._refresh_corrections_count)
        browse = QToolButton()
        browse.setText("…")
        browse.setToolTip("Choose the corrections dataset folder")
        browse.clicked.connect(self._browse_corrections)
        self.corrections_count = QLabel("")
        self.save_button = QPushButton("Save correction")
        self.save_button.setToolTip(
            "Save the edited mask of the last description (and the model's original) for fine-tuning"
        )
        self.save_button.clicked.connect(self.save_correction)
        corrections = QGroupBox("Corrections")
        corrections_layout = QFormLayout(corrections)
        corrections_layout.addRow("Folder", _row(self.corrections_edit, browse))
        corrections_layout.addRow("Records", self.corrections_count)
        corrections_layout.addRow(self.save_button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(_row(self.segment_button, self.cancel_button, as_layout=True))
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(corrections)
        layout.addStretch(1)

    @staticmethod
    def _home() -> Path:
        from lsms_core.checkpoint import models_home

        return Path(models_home())

    # -- public API ----------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self.worker is not None

    @property
    def is_closed(self) -> bool:
        """True once the widget was destroyed or :meth:`teardown` ran: it no longer reacts."""
        return self._lifetime.closed.is_set()

    def teardown(self) -> None:
        """Cancel a running segmentation and disconnect from the viewer (idempotent).

        Runs by itself when the widget is destroyed (viewer closed) or removed from its dock.
        """
        self._lifetime.teardown()

    def _disconnect_viewer(self) -> None:
        """Disconnect every viewer/layer event connection (touches no Qt object)."""
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.reordered):
            with contextlib.suppress(Exception):
                emitter.disconnect(self._on_layers_changed)
        for layer in list(self._named_layers):
            with contextlib.suppress(Exception):
                layer.events.name.disconnect(self._refresh_images)
        self._named_layers.clear()

    def event(self, event) -> bool:
        # napari removes a dock widget by un-parenting it (remove_dock_widget): tear down then.
        if left_its_dock(self, event):
            self.teardown()
        return super().event(event)

    def set_description(self, text: str) -> None:
        self.description_edit.setText(text)

    def selected_image(self) -> Image | None:
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def select_model(self, path: str | Path) -> bool:
        """Choose the model whose file is ``path``; False when it is not in the list."""
        index = self.model_combo.findData(str(Path(path).resolve()))
        if index >= 0:
            self.model_combo.setCurrentIndex(index)
        return index >= 0

    def refresh_models(self, *_signal_args) -> None:
        """Re-list the models (default, user models, fine-tuned versions), keeping the selection."""
        previous = self.model_combo.currentData()
        self.model_combo.clear()
        try:
            from lsms_core.checkpoint import list_models

            entries = list_models()
        except Exception as exc:  # noqa: BLE001 - a broken registry must not break the widget
            entries = []
            notifications.show_warning(f"LSMS: could not list models: {exc}")
        for entry in entries:
            self.model_combo.addItem(
                entry.label + (" - default" if entry.is_default else ""), str(Path(entry.path).resolve())
            )
            self.model_combo.setItemData(
                self.model_combo.count() - 1, _model_tooltip(entry), Qt.ItemDataRole.ToolTipRole
            )
            self.model_combo.setItemData(
                self.model_combo.count() - 1, str(entry.version), Qt.ItemDataRole.UserRole + 1
            )
        if not entries:
            self.model_combo.addItem("no model found (train one with `lsms train`)", None)
            return
        index = self.model_combo.findData(previous) if previous else -1
        if index < 0:
            index = next((i for i, e in enumerate(entries) if e.is_default), 0)
        self.model_combo.setCurrentIndex(index)

    @_guarded
    def segment(self):
        """Start segmenting the current description; returns the worker (None when refused)."""
        if self.is_running:
            raise UserInputError("a segmentation is already running; wait for it or press Cancel")
        request = self._make_request()
        self._check_target_labels(request.image)
        self.recent.add(request.description, save=False)  # saved by the job, off the GUI thread
        self._refresh_suggestions()

        self._cancel.clear()
        worker = create_worker(
            self._run_job,
            request,
            _progress={"desc": f"LSMS: {request.description[:40]}"},
            _ignore_errors=True,
        )
        self._pbar = getattr(worker, "pbar", None)
        worker.returned.connect(functools.partial(self._on_returned, request))
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_running(True, f"Segmenting {request.image.name!r}: {request.description!r} ...")
        worker.start()
        return worker

    def preload(self):
        """Load the selected model on a background thread; returns the worker (None: no model).

        The main job calls this when it opens the window, so model loading (imports, weights), which
        briefly holds Python's GIL, happens while the user reads and types, not after Segment.
        A model that fails to load is reported when Segment is pressed.
        """
        model_path = self.model_combo.currentData()
        if not model_path:
            return None
        device = self.device_combo.currentText() or "auto"
        segmenters = self.segmenters

        def load():
            with contextlib.suppress(Exception):
                segmenters.get(model_path, device)

        worker = create_worker(load, _ignore_errors=True)
        worker.start()
        return worker

    def cancel(self, *_signal_args) -> None:
        """Ask the running segmentation to stop after its current batch."""
        if self.is_running:
            self._cancel.set()
            self.status_label.setText("Cancelling ...")

    @_guarded
    def save_correction(self):
        """Save the current Labels of the last description, with the model's original mask."""
        last = self.last_result
        if last is None:
            raise UserInputError("nothing to save: segment a lesion first, then correct its label")
        if last.labels not in self.viewer.layers or last.image not in self.viewer.layers:
            raise UserInputError("the image or the labels of the last result were closed; segment again")
        if last.labels.data.shape != last.model_mask.shape:
            raise UserInputError(f"Labels layer {last.labels.name!r} changed shape since the segmentation")
        root = Path(self.corrections_edit.text().strip() or self._home() / "corrections")
        source = LayerVolume(last.image)
        corrected = (np.asarray(last.labels.data) == last.label).astype(np.uint8)
        image_ref = (last.image.metadata.get(GEOMETRY_KEY) or {}).get("path") or last.image.name

        def save():
            from lsms_core.data.corrections import CorrectionsDataset

            volume = source.load()  # reads a lazy image off the GUI thread

            dataset = CorrectionsDataset(root)
            # Saving the same description of the same image again replaces the earlier record:
            # the latest correction is the user's answer, two conflicting targets would not be.
            record = dataset.add(
                volume,
                last.description,
                last.model_mask,
                corrected,
                model_version=last.model_version,
                image_ref=image_ref,
                slices=last.slices,
                replace=True,
            )
            return record, len(dataset)

        lifetime = self._lifetime

        def saved_done():
            if not lifetime.closed.is_set():
                self.save_button.setEnabled(True)

        worker = create_worker(save, _ignore_errors=True)
        worker.returned.connect(self._on_saved)
        worker.errored.connect(
            lambda exc: notifications.show_error(f"LSMS: could not save the correction: {exc}")
        )
        worker.finished.connect(saved_done)
        self.save_button.setEnabled(False)
        self.save_worker = worker
        worker.start()
        return worker

    # -- building a request (GUI thread) ----------------------------------------------------------

    def _make_request(self) -> SegmentRequest:
        image = self.selected_image()
        problem = image_problem(image)
        if problem:
            raise UserInputError(problem)
        description = normalize_description(self.description_edit.text())
        if not description:
            raise UserInputError(
                "type a description of the lesion first, e.g. 'the largest lesion in the right lobe'"
            )
        model_path = self.model_combo.currentData()
        if not model_path:
            raise UserInputError(
                "no model available: train one with `lsms train` or pick one with ↻ after installing it"
            )
        if not image.metadata.get(GEOMETRY_KEY):  # volume_for_layer_data will guess the geometry
            notifications.show_warning(
                f"LSMS: image {image.name!r} was not opened with napari-lsms; its orientation is unknown and "
                "is assumed to be LPS (x to the patient's left, y posterior). Open the file with napari-lsms "
                "for reliable left/right."
            )
        return SegmentRequest(
            image=image,
            volume=LayerVolume(image),
            description=description,
            model_path=model_path,
            model_version=self.model_combo.currentData(Qt.ItemDataRole.UserRole + 1) or "",
            device=self.device_combo.currentText() or "auto",
            slices=self._slice_range(image),
            scales=DEFAULT_SCALES if self.multiscale_check.isChecked() else (1.0,),
        )

    def _slice_range(self, image: Image) -> tuple[int, int] | None:
        scope = self.scope_combo.currentText()
        depth = image.data.shape[0]
        if scope == "current slice":
            z = int(round(image.world_to_data(self.viewer.dims.point)[0]))
            z = min(max(z, 0), depth - 1)
            return (z, z + 1)
        if scope == "slice range":
            first, last = self.first_slice.value(), self.last_slice.value()
            if first > last:
                raise UserInputError(
                    f"slice range {first} to {last} is empty: the first slice must not exceed the last"
                )
            ends = [min(max(slider_to_data_slice(image, n), 0), depth - 1) for n in (first, last)]
            return (min(ends), max(ends) + 1)
        return None

    def _linked_labels(self, image: Image) -> list[Labels]:
        """Labels layers made on this very image layer (its unique id in their metadata)."""
        image_id = str(image.unique_id)
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and layer.metadata.get(SOURCE_IMAGE_ID_KEY) == image_id
        ]

    def _target_labels(self, image: Image) -> Labels | None:
        """The Labels layer holding results for ``image``: linked by id and on its geometry.

        A layer of another image (even one with the same name and shape, e.g. the previous
        patient's "ct") or one whose geometry no longer matches is never used: None, a new layer.
        """
        return next((layer for layer in self._linked_labels(image) if same_geometry(image, layer)), None)

    def _check_target_labels(self, image: Image) -> None:
        for labels in self._linked_labels(image):
            if tuple(labels.data.shape) != tuple(image.data.shape):
                raise UserInputError(
                    f"Labels layer {labels.name!r} has shape {tuple(labels.data.shape)} but image {image.name!r} "
                    f"has {tuple(image.data.shape)}; delete or rename that layer, then segment again"
                )

    # -- the job (worker thread) ---------------------------------------------------------------

    def _run_job(self, request: SegmentRequest):
        self.recent.save()
        try:
            segmenter = self.segmenters.get(request.model_path, request.device)
        except Exception as exc:
            raise RuntimeError(f"could not load model {request.model_path}: {exc}") from exc
        if self._cancel.is_set():
            return None
        return segmenter.segment(
            request.volume.load(),
            request.description,
            slices=request.slices,
            progress=self._relay.progress.emit,
            should_cancel=self._cancel.is_set,
            scales=request.scales,
        )

    # -- results (GUI thread) --------------------------------------------------------------------

    def _on_progress(self, done: int, total: int) -> None:
        if self.is_closed:
            return
        self.progress_bar.setMaximum(max(total, 1))
        self.progress_bar.setValue(done)
        if self._pbar is not None:
            if self._pbar.total != total:
                self._pbar.total = total
            if done > self._pbar.n:
                self._pbar.update(done - self._pbar.n)

    def _on_returned(self, request: SegmentRequest, result) -> None:
        if self.is_closed:  # the widget's Qt objects may be deleted: touch nothing
            return
        try:
            self._merge_result(request, result)
        except UserInputError as exc:
            notifications.show_warning(f"LSMS: {exc}")
        except Exception as exc:  # noqa: BLE001 - never let an exception escape into Qt's event loop
            notifications.show_error(f"LSMS: could not show the result: {type(exc).__name__}: {exc}")

    def _merge_result(self, request: SegmentRequest, result) -> None:
        image, description = request.image, request.description
        if result is None or result.cancelled:
            self.status_label.setText("Cancelled; nothing was changed.")
            notifications.show_info("LSMS: segmentation cancelled; nothing was changed")
            return
        if image not in self.viewer.layers:
            raise UserInputError(
                f"image {image.name!r} was closed during the segmentation; nothing was added"
            )
        mask = np.asarray(result.mask)
        found = bool(result.found and mask.any())
        if not found:  # still the current result: the user may paint the missed lesion and save it
            mask = np.zeros(tuple(image.data.shape), dtype=np.uint8)
        self._check_target_labels(image)
        labels = self._target_labels(image)
        if labels is None:
            labels = self._new_labels(image)
        book = LabelBook(labels.features)
        label = book.label_for(description, taken=[int(np.max(labels.data))])
        data = labels.data
        if label > np.iinfo(data.dtype).max:
            data = data.astype(np.uint32)
        # Clears the description's old voxels in the segmented slices, also when nothing was found.
        voxels = merge_mask(data, mask, label, request.slices)
        labels.data = data
        volume_ml = voxels * voxel_volume_ml(request.volume.load().spacing)
        model_version = str(getattr(result, "model_version", None) or request.model_version)
        book.record(
            description, label, model_version=model_version, voxels=voxels, volume_ml=volume_ml, found=found
        )
        labels.features = book.to_features()
        labels.selected_label = label
        labels.refresh()
        self.last_result = LastResult(
            image,
            labels,
            description,
            label,
            (mask > 0).astype(np.uint8),
            model_version,
            request.slices,
            found,
        )
        if found:
            self.status_label.setText(f"Label {label}: {description!r} - {voxels} voxels, {volume_ml:.1f} ml")
        else:
            self.status_label.setText(
                f"Not found: {description!r}. To teach the model, paint the lesion with label {label} "
                "and press Save correction"
            )
            notifications.show_warning(
                f"LSMS: no lesion matching {description!r} was found in {image.name!r}; try other words, another "
                f"scope or another model, or paint it with label {label} and press Save correction"
            )

    def _new_labels(self, image: Image) -> Labels:
        """A Labels layer on ``image``'s grid, linked to it by id.

        It copies the image's geometry metadata only when the image has it: for an image not opened
        with napari-lsms the geometry is a guess, and the Labels layer stays marked as such (no
        ``lsms_volume``), so the writer warns that the orientation of the saved mask is a guess.
        """
        kwargs = {"scale": image.scale, "translate": image.translate, "rotate": image.rotate, "metadata": {}}
        geometry = image.metadata.get(GEOMETRY_KEY)
        if geometry:
            kwargs["metadata"][GEOMETRY_KEY] = dict(geometry)
        kwargs["metadata"][SOURCE_IMAGE_KEY] = image.name
        kwargs["metadata"][SOURCE_IMAGE_ID_KEY] = str(image.unique_id)
        data = np.zeros(image.data.shape, dtype=np.uint8)
        return self.viewer.add_labels(data, name=LABELS_NAME, opacity=0.6, **kwargs)

    def _on_errored(self, exc: BaseException) -> None:
        if self.is_closed:
            return
        self.status_label.setText(f"Failed: {exc}")
        notifications.show_error(f"LSMS: segmentation failed: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self._pbar = None
        if not self.is_closed:
            self._set_running(False)

    def _on_saved(self, payload) -> None:
        record, count = payload
        if not self.is_closed:
            self._count_token = object()  # a count started before the save is out of date
            self.corrections_count.setText(str(count))
        record = record if isinstance(record, dict) else {}
        changed = record.get("changed_voxels", "?")
        replaced = (
            " (it replaces the earlier correction of this description)" if record.get("replaces") else ""
        )
        notifications.show_info(
            f"LSMS: correction of {record.get('expression', '?')!r} saved ({changed} voxels changed){replaced}; "
            f"{count} records in the dataset"
        )

    # -- small UI reactions ------------------------------------------------------------------------

    def _set_running(self, running: bool, message: str | None = None) -> None:
        self.segment_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress_bar.setRange(0, 0)  # busy until the first batch reports
        elif self.progress_bar.maximum() == 0:  # ended before any progress (cancelled, failed)
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(0)
        if message is not None:
            self.status_label.setText(message)

    def _follow_name(self, layer) -> None:
        if layer not in self._named_layers:
            layer.events.name.connect(self._refresh_images)
            self._named_layers.add(layer)

    def _on_layers_changed(self, event=None) -> None:
        if self.is_closed:
            return
        kind = getattr(event, "type", "") if event is not None else ""
        if kind == "inserted":
            self._follow_name(event.value)
        elif kind == "removed" and event.value in self._named_layers:
            with contextlib.suppress(Exception):
                event.value.events.name.disconnect(self._refresh_images)
            self._named_layers.discard(event.value)
        self._refresh_images()

    def _refresh_images(self, *_args) -> None:
        """Re-list the images; the slice range is reset only when the selected image changes."""
        if self.is_closed:
            return
        previous = self._image_ref() if self._image_ref is not None else None
        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        names = [layer.name for layer in images]
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if previous is not None and any(layer is previous for layer in images):
            self.image_combo.setCurrentText(previous.name)  # the same layer, perhaps renamed
        elif current in names:
            self.image_combo.setCurrentText(current)
        else:  # prefer a 3D grayscale image
            good = [n for n in names if image_problem(self.viewer.layers[n]) is None]
            if good:
                self.image_combo.setCurrentText(good[0])
        self.image_combo.blockSignals(False)
        if self.selected_image() is not previous:
            self._on_image_changed()

    def _on_image_changed(self, *_args) -> None:
        image = self.selected_image()
        self._image_ref = weakref.ref(image) if image is not None else None
        depth = image.data.shape[0] if image is not None and image.ndim >= 3 else 1
        for spin in (self.first_slice, self.last_slice):
            spin.setRange(0, max(depth - 1, 0))
        self.last_slice.setValue(max(depth - 1, 0))
        self._refresh_suggestions()

    def _on_scope_changed(self, scope: str) -> None:
        for spin in (self.first_slice, self.last_slice):
            spin.setEnabled(scope == "slice range")

    @_guarded
    def _on_window_changed(self):
        image = self.selected_image()
        if image is None or image_problem(image):
            return
        image.contrast_limits = level_width_to_range(*WINDOW_PRESETS[self.window_combo.currentText()])

    def _refresh_suggestions(self) -> None:
        image = self.selected_image()
        sample = list((image.metadata.get(EXPRESSIONS_KEY) or []) if image is not None else [])
        recent = list(self.recent.items)
        self._completion_model.setStringList(list(dict.fromkeys(recent + sample)))
        self.suggestions_menu.clear()
        for title, texts in (("Recent", recent), ("Sample expressions", sample)):
            if not texts:
                continue
            self.suggestions_menu.addSection(title)
            for text in texts:
                self.suggestions_menu.addAction(text, functools.partial(self.set_description, text))
        self.suggestions_button.setEnabled(bool(recent or sample))

    def _refresh_devices(self) -> None:
        """Offer "auto" now and the machine's devices once a worker has listed them: listing them
        imports torch (a second or more), which must not freeze the window that is opening."""
        from lsms_core.infer import available_devices

        self.device_combo.clear()
        self.device_combo.addItem("auto")

        def show(devices) -> None:
            self.device_combo.addItems([d for d in devices if d != "auto"])

        self.devices_worker = self._look_up(available_devices, show=show)  # on error "auto" stays

    def _refresh_corrections_count(self) -> None:
        """Show how many records the corrections folder holds, counted in a worker (reading the
        records is file I/O that grows with the dataset). A count that a newer one or a save has
        overtaken is dropped."""
        root = Path(self.corrections_edit.text().strip())
        self._count_token = token = object()

        def show(text: str) -> None:
            if self._count_token is token:
                self.corrections_count.setText(text)

        self.corrections_count_worker = self._look_up(_count_corrections, root, show=show)

    def _look_up(self, function: Callable, *args, show: Callable) -> Any:
        """Run the quick query ``function(*args)`` in a worker and ``show`` its answer on the GUI
        thread, unless the widget has closed by then. A failed query shows nothing: what the widget
        showed before stays."""
        lifetime = self._lifetime

        def returned(answer) -> None:
            if not lifetime.closed.is_set():
                show(answer)

        worker = create_worker(function, *args, _ignore_errors=True)
        worker.returned.connect(returned)
        worker.start()
        return worker

    def _browse_corrections(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Corrections dataset folder", self.corrections_edit.text()
        )
        if folder:
            self.corrections_edit.setText(folder)
            self._refresh_corrections_count()


def _count_corrections(root: Path) -> str:
    """The number of records in the corrections folder ``root`` as the widget shows it."""
    if not (root / "expressions.jsonl").exists():
        return "0"
    try:
        from lsms_core.data.corrections import CorrectionsDataset

        return str(len(CorrectionsDataset(root)))
    except Exception as exc:  # noqa: BLE001 - shown in the widget, not raised into Qt
        return f"unreadable: {exc}"


def _row(*widgets, as_layout: bool = False):
    """Widgets side by side (a QWidget for form rows, or the bare layout)."""
    layout = QHBoxLayout()
    layout.setContentsMargins(0, 0, 0, 0)
    for i, w in enumerate(widgets):
        layout.addWidget(w, 1 if i == 0 else 0)
    if as_layout:
        return layout
    holder = QWidget()
    holder.setLayout(layout)
    return holder


def _model_tooltip(entry) -> str:
    metrics = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in (entry.metrics or {}).items()
    )
    return f"{entry.path}\ncreated {entry.created}\n{metrics}".strip()
