"""``connectome view DATASET [--screenshot PNG]``: the napari plugin on a store.

Registered in :mod:`connectome.cli` with ``register(app)``. The viewer and
its widgets live in the ``connectome-napari`` package (``plugins/``); this
module only checks the input, finds a display, and hands over. With
``--screenshot`` on a machine without a display it starts a private Xvfb
server (``Xvfb -displayfd``) for the picture and stops it afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from connectome.errors import InputError, StageError


@contextmanager
def virtual_display(size: str = "1920x1200x24"):
    """Run the block with ``DISPLAY`` set: the existing one, or a private Xvfb started here."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        yield os.environ.get("DISPLAY")
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise StageError("no display and no Xvfb: install xvfb (see docs/review.md) or set DISPLAY")
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", size, "-nolisten", "tcp"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        number = b""
        with os.fdopen(read, "rb") as f:
            while not number.endswith(b"\n"):
                ch = f.read(1)
                if not ch:
                    raise StageError("Xvfb did not start (no display number reported)")
                number += ch
        os.environ["DISPLAY"] = f":{int(number)}"
        yield os.environ["DISPLAY"]
    finally:
        os.environ.pop("DISPLAY", None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()


def view(
    dataset: Path = typer.Argument(..., help="DATASET.zarr"),
    screenshot: Optional[Path] = typer.Option(None, "--screenshot", help="save a PNG of the viewer and exit"),
    widget: list[str] = typer.Option([], "--widget", help="curation | proofreading | partners | run (repeatable; "
                                                          "default by the store's kind)"),
    select: Optional[int] = typer.Option(None, "--select", help="cell or neuron id to select at once"),
    canvas_only: bool = typer.Option(False, "--canvas-only", help="screenshot the canvas without the widgets"),
    size: str = typer.Option("1500,950", "--size", help="window size W,H in pixels"),
):
    """Open a store in napari with the review widgets (or save a picture with --screenshot)."""
    from connectome.io import Dataset

    Dataset(dataset, mode="r")  # a missing or malformed store is a one-line error
    try:
        w, h = (int(v) for v in size.split(","))
    except ValueError:
        raise InputError(f"--size must be W,H in pixels, got {size!r}") from None
    if screenshot is not None and screenshot.suffix.lower() != ".png":
        raise InputError(f"--screenshot must name a .png file, got {screenshot}")
    try:
        from connectome_napari._view import build_viewer, screenshot as take
    except ImportError as e:
        raise StageError(f"connectome view needs the napari plugin ({e}); install it with "
                         "pip install -e \"plugins/connectome-napari\"") from None
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    if screenshot is not None:
        with virtual_display():
            image = take(dataset, screenshot, widgets=widget or None, select=select, canvas_only=canvas_only,
                         size=(w, h))
        typer.echo(f"wrote {screenshot} ({image.shape[1]}×{image.shape[0]})")
        return
    import napari

    build_viewer(dataset, widgets=widget or None, select=select, size=(w, h))
    napari.run()


def register(app: typer.Typer) -> None:
    """Add ``connectome view`` to the ``connectome`` app."""
    app.command("view")(view)
