"""``connectome em`` and ``connectome em-train`` (registered on the main app by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | gpu (gpu without one is an error)")
ClusterOpt = typer.Option("local", "--cluster", help="local | threads | cuda | slurm | pbs | tcp://HOST:PORT")


def _names(text: Optional[str], option: str, default):
    from connectome.errors import InputError

    if text is None:
        return list(default)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError(f"{option}: no stage named")
    return names


#: The stages of ``connectome em`` in pipeline order (DESIGN.md).
ALL_STAGES = ("boundaries", "fragments", "agglomeration", "synapses", "graph")
GRAPH_STAGES = ("synapses", "graph")


def _split_stages(names, over, synapses):
    """Validate ``--stages`` / ``--overwrite`` and group runs of segmentation stages."""
    from connectome.errors import InputError

    for group, items in (("--stages", names), ("--overwrite", over)):
        unknown = [s for s in items if s not in ALL_STAGES]
        if unknown:
            raise InputError(f"{group}: unknown EM stage(s) {', '.join(unknown)}; available: {', '.join(ALL_STAGES)}")
    if synapses is not None and "synapses" not in names:
        raise InputError("--synapses TABLE is imported by the synapses stage, which --stages leaves out")
    runs = []
    for name in names:
        kind = "graph" if name in GRAPH_STAGES else "em"
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(name)
        else:
            runs.append((kind, [name]))
    return runs


def em(
    dataset: Path = typer.Argument(..., help="DATASET.zarr with an EM raw volume (z, y, x)"),
    stages: Optional[str] = typer.Option(None, "--stages",
                                         help="comma-separated, in order: boundaries,fragments,agglomeration,"
                                              "synapses,graph (default: all; synapses only with --synapses or a "
                                              "[synapses] model in --config)"),
    boundaries: Optional[str] = typer.Option(None, "--boundaries",
                                             help="your own boundary (Z,Y,X) or affinity (3,Z,Y,X) map: a path "
                                                  "in the store or a Zarr array / OME-Zarr on disk"),
    boundary_model: Optional[Path] = typer.Option(None, "--boundary-model",
                                                  help="pixel classifier from `connectome em-train` (.npz)"),
    synapses: Optional[str] = typer.Option(None, "--synapses",
                                           help="your own synapse detections (CSV/Parquet with pre/post points), "
                                                "imported by the synapses stage instead of detecting"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON file, one section per stage"),
    device: str = DeviceOpt,
    cluster: str = ClusterOpt,
    overwrite: list[str] = typer.Option([], "--overwrite", help="recompute this stage even if done (repeatable)"),
):
    """Structural half: boundary maps, supervoxels, neurons, synapses and the wiring graph."""
    from connectome.backend import resolve_device
    from connectome.config import load_config
    from connectome.errors import InputError
    from connectome.io import Dataset
    from workflows.cluster import check_cluster, executor
    from workflows.em import AVAILABLE, EMConfig, check_stages, check_volume, run_em

    cfg = load_config(config)
    syn_section = cfg.get("synapses") or {}
    over = [n.strip() for item in overwrite for n in item.split(",") if n.strip()]
    if stages is None:
        names = list(AVAILABLE) + [s for s in ALL_STAGES if s not in AVAILABLE and s in GRAPH_STAGES
                                   and (s != "synapses" or synapses is not None or syn_section.get("model"))]
    else:
        names = _names(stages, "--stages", ALL_STAGES)
    runs = _split_stages(names, over, synapses)
    check_stages([n for n in names if n not in GRAPH_STAGES], [n for n in over if n not in GRAPH_STAGES])
    if boundaries is not None and boundary_model is not None:
        raise InputError("give either --boundaries (your own map) or --boundary-model, not both")
    em_cfg = EMConfig.from_dict({k: v for k, v in cfg.items() if k not in ("cluster", "synapses", "graph")})
    if any(kind == "graph" for kind, _ in runs):
        from workflows.synapses import SynapsesConfig

        syn_cfg = SynapsesConfig.from_dict(syn_section)  # a bad [synapses] section fails here, before any work
        if "synapses" in names and synapses is None and syn_cfg.model is None:
            from connectome.errors import StageError

            raise StageError("the synapses stage needs detections to import (--synapses TABLE) or a synapse model "
                             "([synapses] model = PATH in --config, from `connectome em-train --target synapses`)")
        if "synapses" in names and synapses is None:
            from connectome.em._synapses import load_synapse_model

            load_synapse_model(syn_cfg.model)  # a bad model file fails here
    dev = resolve_device(device)
    check_cluster(cluster)
    ds = Dataset(dataset)
    check_volume(ds)
    model = None
    if boundary_model is not None:
        from connectome.em import load_model

        model = load_model(boundary_model)  # a bad model file fails here, before any work
    results = {}
    with executor(cluster, settings=cfg.get("cluster")) as ex:
        if ex.dashboard_link:
            typer.echo(f"Dask dashboard: {ex.dashboard_link}")
        for kind, group in runs:
            if kind == "em":
                results.update(run_em(ds, group, config=em_cfg, boundaries=boundaries, boundary_model=model,
                                      executor=ex, device=dev, overwrite=tuple(o for o in over if o in group)))
            else:
                from workflows.synapses import run_synapse_stages

                results.update(run_synapse_stages(ds, group, synapses=synapses, config=cfg, executor=ex, device=dev,
                                                  overwrite=tuple(over)))
    for stage, metrics in results.items():
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        typer.echo(f"{stage}: {shown}")


def em_train(
    dataset: Path = typer.Argument(..., help="DATASET.zarr with an EM raw volume (z, y, x)"),
    labels: Path = typer.Option(..., "--labels", help="TIFF or Zarr, shape of raw/0: 0 unlabelled, 1 inside, "
                                                      "2 boundary (with --target synapses: 1 not a synapse, "
                                                      "2 synaptic cleft)"),
    out: Path = typer.Option(..., "--out", help="model file to write (.npz; loads without executing code)"),
    target: str = typer.Option("boundaries", "--target", help="boundaries (pixel classifier for the boundaries "
                                                              "stage) | synapses (synapse detector; needs "
                                                              "em/segmentation)"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON file ([em] block_shape, "
                                                                 "[boundaries] mode, [synapses] …)"),
    n_trees: int = typer.Option(32, "--trees", help="trees in the random forest"),
    max_depth: int = typer.Option(14, "--max-depth", help="depth limit of each tree"),
    device: str = DeviceOpt,
):
    """Train the pixel classifier (random forest on multiscale features) from sparse labels."""
    from connectome.backend import resolve_device
    from connectome.config import load_config
    from connectome.errors import InputError
    from connectome.io import Dataset

    if target not in ("boundaries", "synapses"):
        raise InputError(f"--target must be 'boundaries' or 'synapses', got {target!r}")
    cfg_all = load_config(config)
    dev = resolve_device(device)
    ds = Dataset(dataset, mode="r")
    if target == "synapses":
        from workflows.em import check_volume
        from workflows.synapses import train_synapses

        check_volume(ds)
        info = train_synapses(ds, labels, out, config=cfg_all.get("synapses"), n_trees=n_trees,
                              max_depth=max_depth, device=dev)
        typer.echo(f"wrote {info['out']}: {info['n_samples']['boundary']} cleft + {info['n_samples']['inside']} "
                   f"background samples, {info['candidates']} candidates ({info['candidates_positive']} synapses, "
                   f"{info['candidates_negative']} not), object classifier: {info['object_classifier']}, "
                   f"{info['seconds']} s")
        return
    from workflows.em import EMConfig, train_model

    cfg = EMConfig.from_dict({k: v for k, v in cfg_all.items() if k not in ("cluster", "synapses", "graph")})
    info = train_model(ds, labels, out, config=cfg, n_trees=n_trees, max_depth=max_depth, device=dev)
    typer.echo(f"wrote {info['out']}: {info['n_features']} {info['mode']} features, "
               f"{info['inside']} inside + {info['boundary']} boundary samples, {info['seconds']} s")


def register(app: typer.Typer) -> None:
    """Add the EM commands to the ``connectome`` app."""
    app.command("em")(em)
    app.command("em-train")(em_train)
