"""Run ``lsms train`` in a subprocess and stream its progress events (no Qt here).

The fine-tune widget must stay responsive while a model trains, and a crash or a cancel of the
training must never take napari down with it. So training runs in its own process (and process
group) started with ``python -m lsms_core.cli train ... --json-progress``; the CLI prints one JSON
event per stdout line (``{"event": "start"|"step"|"validation"|"checkpoint"|"end"|"stopped",
"step", "total_steps", "epoch", "loss", "lr", "metrics"}``). A background thread parses those
lines into a queue that :meth:`TrainingProcess.poll` drains; another keeps the tail of stderr for
error messages.

Cancelling is cooperative first: the CLI watches for ``OUT/STOP`` and stops cleanly after the
current step; after a grace period the process group gets SIGTERM, and later SIGKILL.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

TEXT_TRAINABLE = ("frozen", "last_k", "full")

#: Lines of stderr kept for error messages.
STDERR_TAIL_LINES = 40


def build_train_command(
    data: str | os.PathLike,
    base_model: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    text_trainable: str = "frozen",
    extra_args: list[str] | None = None,
) -> list[str]:
    """The argv that trains ``base_model`` on ``data`` into ``out_dir`` with JSON progress on stdout."""
    if text_trainable not in TEXT_TRAINABLE:
        raise ValueError(f"text_trainable: {text_trainable!r} is not one of {', '.join(TEXT_TRAINABLE)}")
    if epochs is None and max_steps is None:
        raise ValueError("give epochs or max_steps (how long to fine-tune)")
    command = [sys.executable, "-m", "lsms_core.cli", "train"]
    command += ["--data", str(Path(data).expanduser()), "--out", str(Path(out_dir).expanduser())]
    if base_model is not None:
        command += ["--init-from", str(Path(base_model).expanduser())]
    if epochs is not None:
        command += ["--epochs", str(int(epochs))]
    if max_steps is not None:
        command += ["--max-steps", str(int(max_steps))]
    if lr is not None:
        command += ["--lr", repr(float(lr))]
    if batch_size is not None:
        command += ["--batch-size", str(int(batch_size))]
    command += ["--text-trainable", text_trainable, "--json-progress", *(extra_args or [])]
    return command


class TrainingProcess:
    """A training run in a subprocess whose progress events can be polled.

    Args:
        data: the dataset folder (e.g. the corrections dataset).
        base_model: the model to start from (``--init-from``); ``None`` trains from scratch.
        out_dir: where the run writes checkpoints; ``out_dir/model.safetensors`` is the best model.
        epochs, max_steps: how long to train (at least one of them).
        lr: learning rate (``None``: the CLI's default).
        batch_size: slices per step (``None``: the CLI's default).
        text_trainable: ``"frozen"``, ``"last_k"`` or ``"full"``.
        extra_args: more CLI arguments, appended as given.
        env: extra environment variables for the subprocess.

    The process starts on construction. Use :meth:`poll` to fetch new events, :attr:`returncode`
    to see whether it ended, :meth:`cancel` to stop it and :attr:`stderr_tail` to explain a crash.
    """

    def __init__(
        self,
        data: str | os.PathLike,
        base_model: str | os.PathLike | None,
        out_dir: str | os.PathLike,
        *,
        epochs: int | None = None,
        max_steps: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        text_trainable: str = "frozen",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir).expanduser()
        self.command = build_train_command(
            data, base_model, out_dir, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
            text_trainable=text_trainable, extra_args=extra_args,
        )  # fmt: skip
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._events: queue.Queue[dict] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.other_output: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.last_event: dict | None = None
        self.cancelled = False
        self._cancel_thread: threading.Thread | None = None

        process_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        popen_kwargs: dict = {}
        if os.name == "posix":
            popen_kwargs["start_new_session"] = True  # own process group: signals reach its children
        else:
            popen_kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=process_env,
            **popen_kwargs,
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, name="lsms-train-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="lsms-train-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    # ------------------------------------------------------------------ state

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended, else ``None``."""
        return self._process.poll()

    @property
    def running(self) -> bool:
        return self.returncode is None

    @property
    def finished(self) -> bool:
        """True when the process has ended and all of its output has been read."""
        return self.returncode is not None and not any(reader.is_alive() for reader in self._readers)

    @property
    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr (the traceback when it crashed)."""
        return "\n".join(self._stderr)

    @property
    def succeeded(self) -> bool:
        """Ended with status 0 and a best model in ``out_dir`` (not cancelled)."""
        return (
            self.returncode == 0 and not self.cancelled and (self.out_dir / "model.safetensors").exists()
        )

    def poll(self) -> list[dict]:
        """Return the events received since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends and its output is read; return the exit status."""
        returncode = self._process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return returncode

    # ------------------------------------------------------------------ stopping

    def cancel(self, grace: float = 10.0, kill_after: float = 5.0) -> None:
        """Ask the run to stop; never blocks.

        Writes ``out_dir/STOP`` (the CLI stops cleanly after the current step); if the process is
        still alive after ``grace`` seconds its process group gets SIGTERM, and SIGKILL after
        ``kill_after`` more.
        """
        if self.returncode is not None or self._cancel_thread is not None:
            return
        self.cancelled = True
        try:
            (self.out_dir / "STOP").touch()
        except OSError:
            grace = 0.0  # cannot ask nicely: go straight to SIGTERM
        self._cancel_thread = threading.Thread(
            target=self._escalate, args=(grace, kill_after), name="lsms-train-cancel", daemon=True
        )
        self._cancel_thread.start()

    def _escalate(self, grace: float, kill_after: float) -> None:
        for stop_signal, delay in ((signal.SIGTERM, grace), (getattr(signal, "SIGKILL", None), kill_after)):
            try:
                self._process.wait(delay)
                return
            except subprocess.TimeoutExpired:
                self._signal(stop_signal)

    def _signal(self, stop_signal) -> None:
        try:
            if os.name == "posix":
                os.killpg(self._process.pid, stop_signal)
            elif stop_signal is signal.SIGTERM:
                self._process.terminate()
            else:
                self._process.kill()
        except (ProcessLookupError, PermissionError):
            pass  # already gone

    # ------------------------------------------------------------------ readers

    def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            event = parse_event(line)
            if event is None:
                if line.strip():
                    self.other_output.append(line.rstrip("\n"))
                continue
            self.last_event = event
            self._events.put(event)

    def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self._stderr.append(line.rstrip("\n"))


def parse_event(line: str) -> dict | None:
    """Parse one ``--json-progress`` line; ``None`` for anything that is not an event object."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or "event" not in event:
        return None
    return event


def publish_model(
    trained: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    base_model: str | os.PathLike,
    data: str | os.PathLike,
    version: str | None = None,
    device: str = "auto",
) -> Path:
    """Publish a fine-tuned model as a new version, with before/after figures on its card.

    Evaluates ``base_model`` and ``trained`` on the validation (``val``) split of the corrections
    dataset ``data`` with :func:`lsms_core.evaluate.evaluate_path` and saves ``trained`` to
    ``dest`` (``.../NAME/model.safetensors``) with ``metrics = {**training metrics, "before":
    {...}, "after": {...}}`` (each the evaluation's ``overall`` metrics plus ``split``, ``items``
    and ``model``; both ``None`` when no image is in ``val`` yet). ``dest`` must not exist: a
    published version is never overwritten, so earlier versions stay available for rollback.

    The ``val`` images are never trained on, but the training run used that same split to pick
    its best checkpoint and to stop early, so "after" is a model-selection (validation) figure,
    biased upward, not an independent test score. The corrections dataset has no test split
    (with a handful of corrected images there is rarely one to spare), so none is claimed.
    """
    from lsms_core.checkpoint import load_model, read_model_card, save_model
    from lsms_core.data.dataset import ReferringDataset
    from lsms_core.evaluate import evaluate_path

    trained, dest, base_model, data = (Path(p).expanduser() for p in (trained, dest, base_model, data))
    if dest.exists():
        raise ValueError(f"{dest} already exists; published models are never overwritten, pick a new name")
    card = read_model_card(trained)
    before = after = None
    if ReferringDataset(data).splits.get("val"):
        reports = [evaluate_path(path, data, "val", device=device) for path in (base_model, trained)]
        before, after = (
            {**report["overall"], "split": "val", "items": report["items"], "model": report["model"]}
            for report in reports
        )
    metrics = {**dict(card.get("metrics") or {}), "before": before, "after": after}
    extra = {
        **dict(card.get("extra") or {}),
        "base_model": str(base_model),
        "fine_tuned_on": str(data),
        "kind": "fine-tuned on corrections",
    }
    model = load_model(trained, device="cpu")
    return save_model(
        model, dest, metrics=metrics, data_fingerprint=card.get("data_fingerprint"), extra=extra, version=version
    )
