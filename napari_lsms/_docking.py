"""When a dock widget leaves the viewer.

napari's ``remove_dock_widget`` (a dock's close button) only un-parents the widget: it gets no
``closeEvent``. :func:`left_its_dock` tells that moment apart in the widget's ``event()``.
"""

from __future__ import annotations

from qtpy.QtCore import QEvent
from qtpy.QtWidgets import QWidget

_DOCKED = "lsms_docked"


def left_its_dock(widget: QWidget, event: QEvent) -> bool:
    """True when ``event`` takes away the parent (dock) ``widget`` had; call it from ``event()``."""
    if event.type() != QEvent.Type.ParentChange:
        return False
    if widget.parent() is not None:
        widget.setProperty(_DOCKED, True)
        return False
    was_docked = bool(widget.property(_DOCKED))
    widget.setProperty(_DOCKED, False)
    return was_docked
