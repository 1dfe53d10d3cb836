"""Run pipeline stages on the open store from napari: worker thread, progress bar, cancel.

The stages are the workflows' own (``workflows.twophoton.run_twophoton``,
``workflows.em.run_em``, ``workflows.graph.run_graph``) on Dask's threaded
scheduler. Progress comes from the executor's per-task callback; cancel
stops the stage between blocks (the blockwise runner records finished
blocks, so a later run resumes where this one stopped).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import queue
import threading
from pathlib import Path

from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton, Select

from connectome_napari._reader import PATH_KEY, STORE_KEY, read_store

DEVICES = ("auto", "cpu", "gpu")


class StageCancelled(Exception):
    """Raised between blocks when the user pressed Cancel."""


def _executor_class():
    from workflows.cluster import Executor

    class ProgressExecutor(Executor):
        """Dask's threaded scheduler, reporting each finished task and stopping on cancel."""

        def __init__(self, report, cancel: threading.Event):
            super().__init__(None, "threads")
            self.report = report
            self.cancel = cancel

        def run(self, tasks, on_done=None):
            if self.cancel.is_set():
                raise StageCancelled("cancelled")
            if not tasks:
                return []
            key = str(tasks[0].key)
            name = key.split("-block-")[0].rsplit("-", 1)[0] if "-" in key else key
            total, done = len(tasks), [0]
            self.report(name, 0, total)

            def callback(result):
                done[0] += 1
                if on_done is not None:
                    on_done(result)
                self.report(name, done[0], total)
                if self.cancel.is_set():
                    raise StageCancelled(f"cancelled after {done[0]} of {total} blocks of {name}")

            # one wave of as many blocks as there are threads at a time, so that cancel stops
            # between waves whatever the speed of the blocks (a wave already running finishes
            # and is recorded; the blockwise runner resumes the rest later)
            import dask

            wave = max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))
            results = []
            for start in range(0, total, wave):
                results += super().run(tasks[start:start + wave], callback)
                if self.cancel.is_set() and start + wave < total:
                    raise StageCancelled(f"cancelled after {done[0]} of {total} blocks of {name}")
            return results

    return ProgressExecutor


def stage_functions(kind: str) -> tuple[list[str], dict]:
    """Stages offered for a store kind, and the config sections (dataclasses) they read."""
    if kind == "twophoton":
        from workflows.twophoton import STAGES, RegistrationConfig

        return list(STAGES), {"registration": RegistrationConfig}
    from workflows.em import AVAILABLE, AgglomerationConfig, BlockConfig, BoundariesConfig, FragmentsConfig

    return list(AVAILABLE) + ["graph"], {"em": BlockConfig, "boundaries": BoundariesConfig,
                                         "fragments": FragmentsConfig, "agglomeration": AgglomerationConfig}


def run_stages(store, kind: str, stages, *, config: dict, device: str, report, cancel: threading.Event) -> dict:
    """Run ``stages`` of a store (no Qt): the function the worker thread calls."""
    from connectome.backend import resolve_device
    from connectome.io import Dataset

    ds = Dataset(store)
    ex = _executor_class()(report, cancel)
    dev = resolve_device(device)
    out = {}
    if kind == "twophoton":
        from workflows.twophoton import run_twophoton

        out.update(run_twophoton(ds, list(stages), config=config, executor=ex, device=dev, show_progress=False))
    else:
        from workflows.em import run_em
        from workflows.graph import run_graph

        em_stages = [s for s in stages if s != "graph"]
        if em_stages:
            out.update(run_em(ds, em_stages, config=config, executor=ex, device=dev, show_progress=False))
        if "graph" in stages:
            if cancel.is_set():
                raise StageCancelled("cancelled")
            out["graph"] = run_graph(ds, executor=ex, device=dev, show_progress=False)
    return out


def _job(fn):
    """Generator for napari's thread_worker: runs ``fn(report)`` in a thread, yields its progress."""
    q: queue.Queue = queue.Queue()
    result: dict = {}

    def target():
        try:
            result["value"] = fn(lambda *a: q.put(a))
        except BaseException as e:  # handed to the GUI thread below
            result["error"] = e
        finally:
            q.put(None)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    while True:
        item = q.get()
        if item is None:
            break
        yield item
    t.join()
    return result  # {"value": …} or {"error": exception}: failures are shown in the widget, not re-raised


def _literal(text: str):
    text = text.strip()
    if text in ("", "None"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain word (mode names …)


class RunWidget(Container):
    """Run stages of the open store with parameters from its config sections."""

    def __init__(self, viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.store = None
        self.kind = None
        self.worker = None
        self.cancel_event = threading.Event()
        self.pbar = None
        self.result = None
        self.error = None
        self.status = Label(label="", value="open a store")
        self._stage_names: list[str] = []
        # choices as a callable: napari calls reset_choices() on docking and on layer events
        self.stages = Select(label="stages", choices=lambda _w: self._stage_names)
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.config_file = FileEdit(label="config file", mode="r", filter="*.toml *.json", value="")
        self.params = Container(labels=True, scrollable=True)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.extend([self.status, self.stages, self.device, self.config_file, self.params, self.run_button,
                     self.cancel_button])
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        viewer.layers.events.inserted.connect(self._find)
        self._find()

    def _find(self, event=None):
        layer = next((l for l in self.viewer.layers if l.metadata.get(PATH_KEY) == "raw"), None)
        if layer is None or layer.metadata[STORE_KEY] == self.store:
            return
        from connectome.io import Dataset

        self.store = layer.metadata[STORE_KEY]
        self.kind = Dataset(self.store, mode="r").kind
        names, sections = stage_functions(self.kind)
        self._stage_names = names
        self.stages.reset_choices()
        self.stages.value = names[:2] if self.kind == "twophoton" else names[:3]
        self.sections = sections
        self.params.clear()
        for section, cls in sections.items():
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                self.params.append(LineEdit(name=f"{section}__{f.name}", label=f"{section}.{f.name}",
                                            value=repr(default)))
        self.status.value = f"{Path(self.store).name} ({self.kind})"

    def config(self) -> dict:
        """The config file's sections, with the fields edited in the form on top."""
        from connectome.config import load_config

        path = self.config_file.value
        cfg = load_config(path) if path and Path(path).is_file() else {}
        cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
        for w in self.params:
            section, name = w.name.split("__", 1)
            cls = self.sections[section]
            f = next(x for x in dataclasses.fields(cls) if x.name == name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = _literal(w.value)
            if value != default and not (isinstance(default, tuple) and value == list(default)):
                cfg.setdefault(section, {})[name] = value
        return cfg

    def run(self, *_):
        """Start the selected stages in a worker thread; returns the worker."""
        from napari.qt.threading import thread_worker

        if self.store is None or self.worker is not None:
            return None
        stages, config, device = list(self.stages.value), self.config(), self.device.value
        order = self.stages.choices
        stages = [s for s in order if s in stages]
        self.cancel_event.clear()
        self.result = self.error = None
        fn = lambda report: run_stages(self.store, self.kind, stages, config=config, device=device,  # noqa: E731
                                       report=report, cancel=self.cancel_event)
        self.worker = thread_worker(_job, start_thread=False)(fn)
        self.worker.yielded.connect(self._progress)
        self.worker.returned.connect(self._returned)
        self.worker.errored.connect(self._errored)
        self.worker.finished.connect(self._finished)
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"running {', '.join(stages)} …"
        self.worker.start()
        return self.worker

    def cancel(self, *_):
        """Stop after the blocks in flight; the finished blocks are kept for the next run."""
        self.cancel_event.set()
        self.status.value = "cancelling after the blocks in flight …"

    def _progress(self, item):
        from napari.utils import progress

        name, done, total = item
        if self.pbar is None or self.pbar.desc != name or self.pbar.total != total:
            if self.pbar is not None:
                self.pbar.close()
            self.pbar = progress(total=total, desc=name)
        self.pbar.update(done - self.pbar.n)

    def _returned(self, outcome):
        if "error" in outcome:
            self._errored(outcome["error"])
            return
        self.result = value = outcome.get("value")
        shown = "; ".join(f"{k}: done" for k in (value or {}))
        self.status.value = shown or "nothing to run"

    def _errored(self, exc):
        self.error = exc
        if isinstance(exc, StageCancelled):
            self.status.value = f"{exc} (finished blocks are kept; Run resumes)"
        else:
            self.status.value = f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"

    def _finished(self):
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        self.worker = None
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self.refresh_layers()

    def refresh_layers(self):
        """Re-read the store's layers and add the ones a stage just wrote."""
        from connectome_napari._widgets import refresh_layer

        present = {l.metadata.get(PATH_KEY): l for l in self.viewer.layers if l.metadata.get(STORE_KEY) == self.store}
        for data, kwargs, kind in read_store(self.store):
            path = kwargs["metadata"][PATH_KEY]
            layer = present.get(path)
            if layer is None:
                getattr(self.viewer, f"add_{kind}")(data, **kwargs)
            elif kind in ("image", "labels") and layer.name == kwargs["name"]:
                refresh_layer(layer)
            else:  # e.g. "(incomplete)" finished: replace the layer
                self.viewer.layers.remove(layer)
                getattr(self.viewer, f"add_{kind}")(data, **kwargs)
