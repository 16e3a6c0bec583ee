"""Package-level promises: the engine never pulls in the GUI, the manifest is valid and packaged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "; import sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return set(out.split())


def test_import_lsms_core_loads_neither_napari_nor_qt():
    # The public API too: building blocks that a script uses must not drag the GUI in.
    modules = _modules_after("import lsms_core; lsms_core.LSMS; lsms_core.Segmenter; lsms_core.Trainer")
    gui = sorted(
        m
        for m in modules
        if m.split(".")[0] in {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui"}
    )
    assert gui == []
    assert "lsms_core.model" in modules  # the names really were resolved


def test_manifest_is_valid_and_found_by_npe2():
    import npe2

    manifest = npe2.PluginManifest.from_distribution("napari-lsms")
    assert manifest.name == "napari-lsms"
    assert (ROOT / "napari_lsms" / "napari.yaml").resolve() == (ROOT / "napari.yaml").resolve()
    commands = {c.id for c in manifest.contributions.commands}
    for contribution in ("read_ct", "write_labels", "sample_ct", "segment_widget", "finetune_widget"):
        assert f"napari-lsms.{contribution}" in commands
    result = subprocess.run(["npe2", "validate", "napari-lsms"], capture_output=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr


def test_atomic_writes_keep_normal_permissions_even_when_the_writer_replaces_the_file(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    from lsms_core._atomic import atomic_path

    target = tmp_path / "w.safetensors"
    with atomic_path(target) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors creates its file 0600
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~mask


def test_every_public_name_of_both_packages_resolves_to_its_declared_module():
    """``__all__`` of ``lsms_core`` and ``napari_lsms`` are lazy: each name must import, in a fresh
    interpreter, as the very object defined in the module that ``_EXPORTS`` declares for it."""
    code = """
import importlib, importlib.metadata, json
problems, resolved = [], 0
for package in ("lsms_core", "napari_lsms"):
    pkg = importlib.import_module(package)
    if sorted(pkg.__all__) != sorted(["__version__", *pkg._EXPORTS]) or sorted(dir(pkg)) != sorted(pkg.__all__):
        problems.append(f"{package}: __all__ {pkg.__all__} / dir() do not list exactly _EXPORTS + __version__")
    if pkg.__version__ != importlib.metadata.version("napari-lsms"):
        problems.append(f"{package}.__version__ {pkg.__version__!r} is not the distribution's")
    for name in pkg.__all__:
        if name == "__version__":
            continue
        module = pkg._EXPORTS[name]
        value = getattr(pkg, name)
        resolved += 1
        if value is not getattr(importlib.import_module(module), name):
            problems.append(f"{package}.{name} is not {module}.{name}")
        if (getattr(value, "__module__", None), getattr(value, "__name__", None)) != (module, name):
            problems.append(f"{package}.{name} is {value!r}, not defined in {module}")
print(json.dumps({"problems": problems, "resolved": resolved}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["problems"] == []
    assert result["resolved"] == 16 + 5  # lsms_core's 16 exports and napari_lsms's 5, none skipped
