"""``mmrank export RUN --out REPO``: a trained run -> a verified model repository.

Exporting side (imports torch, the models and the run loader). Layout written
(DESIGN section 3; Triton reads the model directories, mmrank the root files)::

    REPO/manifest.json
    REPO/ranker/config.pbtxt             CPU instances (ONNX Runtime backend)
    REPO/ranker/configs/gpu.pbtxt        GPU variant (--model-config-name=gpu)
    REPO/ranker/1/model.onnx             float32
    REPO/ranker/1/model.fp16.onnx        with --fp16 (float16 inside, float32 I/O)
    REPO/item_tower/...                  the same for the item tower
    REPO/golden_<graph>.npz              inputs + PyTorch reference outputs per graph
    REPO/reference.safetensors           the run's weights (PyTorch reference backend)
    REPO/reference.json                  the run's config.json

Guarantees: the graphs are traced with ``torch.export`` (strict) so U, N, B (and
the item tower's I, L) are symbolic, not sizes of the example batch; ``onnx.checker``
passes on each graph; each graph matches the PyTorch reference on its golden batch
within its tolerance before anything is written; the repository appears at ``REPO``
whole (written beside it, then renamed) and :func:`~model_export.repository.open_repository`
accepts it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from torch import nn

from model_export.errors import ExportError
from model_export.graphs import (
    ItemTowerGraph,
    RankerGraph,
    item_tower_dynamic_shapes,
    item_tower_example,
    item_tower_outputs,
    ranker_dynamic_shapes,
    ranker_example,
)
from model_export.manifest import (
    HASHING,
    ITEM_TOWER,
    ITEM_TOWER_AXES,
    ITEM_TOWER_INPUTS,
    MANIFEST,
    RANKER,
    RANKER_AXES,
    RANKER_INPUTS,
    RANKER_OUTPUTS,
    Field,
    GraphSpec,
    Manifest,
    TensorSpec,
    item_record_json,
)
from model_export.repository import (
    load_session,
    max_abs_diff,
    open_repository,
    session_options,
    sha256_file,
)
from model_export.triton import render_config
from models.camenn import CameNN
from models.em3 import EM3

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
REFERENCE_WEIGHTS = "reference.safetensors"
REFERENCE_CONFIG = "reference.json"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def field_names(
    data_ref: str, user_buckets: list[int], item_buckets: list[int]
) -> tuple[tuple[Field, ...], tuple[Field, ...], str]:
    """The run's hashed fields by name (from the dataset module the run was trained
    on), checked against the bucket counts in its config; unknown datasets get
    positional names, and the returned note says so."""
    module = {"movielens": "data.movielens", "hm": "data.hm"}.get(data_ref, "data.world")
    source = importlib.import_module(module)
    users = tuple(Field(f.name, f.buckets) for f in source.USER_FIELDS)
    items = tuple(Field(f.name, f.buckets) for f in source.ITEM_FIELDS)
    if [f.buckets for f in users] == user_buckets and [f.buckets for f in items] == item_buckets:
        return users, items, ""
    return (
        tuple(Field(f"user_field_{i}", b) for i, b in enumerate(user_buckets)),
        tuple(Field(f"item_field_{i}", b) for i, b in enumerate(item_buckets)),
        f"field names unknown for data {data_ref!r}: positional names",
    )


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """The ONNX optimiser logs every pass at INFO; keep it to warnings while exporting."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers)]
    for lg, _ in saved:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _rename_axes(model: onnx.ModelProto, specs: tuple[TensorSpec, ...]) -> None:
    """Give the exporter's symbolic dims (``s13``...) the manifest's axis names,
    everywhere in the graph."""
    by_name = {t.name: t for t in specs}
    mapping: dict[str, str] = {}
    for vi in [*model.graph.input, *model.graph.output]:
        spec = by_name.get(vi.name)
        if spec is None:
            continue
        for dim, axis in zip(vi.type.tensor_type.shape.dim, spec.shape, strict=True):
            if (
                isinstance(axis, str)
                and dim.dim_param
                and mapping.setdefault(dim.dim_param, axis) != axis
            ):
                raise ExportError(
                    f"symbolic dim {dim.dim_param} is both {axis} and {mapping[dim.dim_param]}"
                )
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def _export_graph(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[dict[int, Any], ...],
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    specs: tuple[TensorSpec, ...],
    opset: int,
    path: Path,
    metadata: dict[str, str],
) -> None:
    chatter = io.StringIO()  # the ONNX exporter reports progress on stdout
    with (
        contextlib.redirect_stdout(chatter),
        _quiet("onnx_ir", "onnxscript"),
        warnings.catch_warnings(),
    ):
        # torch's own deprecation notices and axis-renaming remarks, not about this model
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name", category=UserWarning)
        try:
            ep = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=True)
        except Exception as exc:
            raise ExportError(f"torch.export failed for {path.name}: {exc}") from exc
        program = torch.onnx.export(
            ep,
            input_names=list(inputs),
            output_names=list(outputs),
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    log.debug("%s", chatter.getvalue())
    if program is None:
        raise ExportError(f"the ONNX exporter returned nothing for {path.name}")
    model = program.model_proto
    _rename_axes(model, specs)
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    model.doc_string = metadata.get("mmrank.description", "")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _ranker_specs(model: CameNN | EM3) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    cfg = model.cfg
    fu, fi, q, d = len(cfg.user_buckets), len(cfg.item_buckets), cfg.q, cfg.d
    ins = (
        TensorSpec("user_sparse", "int64", ("U", fu)),
        TensorSpec("hist_emb", "float32", ("U", "N", q, d)),
        TensorSpec("hist_sparse", "int64", ("U", "N", fi)),
        TensorSpec("hist_mask", "bool", ("U", "N")),
        TensorSpec("cand_emb", "float32", ("B", q, d)),
        TensorSpec("cand_sparse", "int64", ("B", fi)),
        TensorSpec("cand_user", "int64", ("B",)),
    )
    return ins, (TensorSpec("cvr", "float32", ("B",)),)


def _tower_specs(model: CameNN | EM3) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    cfg = model.cfg
    ins = (
        TensorSpec("text", "float32", ("I", "L", cfg.text_dim)),
        TensorSpec("text_len", "int64", ("I",)),
        TensorSpec("image", "float32", ("I", cfg.n_patches, cfg.image_dim)),
        TensorSpec("has_image", "bool", ("I",)),
    )
    outs = [TensorSpec("emb", "float32", ("I", cfg.q, cfg.d))]
    if isinstance(model, CameNN):
        outs += [TensorSpec("ita", "float32", ("I",)), TensorSpec("tia", "float32", ("I",))]
    return ins, tuple(outs)


def golden_ranker_batch(model: CameNN | EM3) -> tuple[torch.Tensor, ...]:
    """A small batch with the cases that matter: several users, padded histories,
    one user with an empty history, candidates interleaved across users."""
    x = list(ranker_example(model, u=3, n=6, b=10, seed=1))
    x[3][2] = False  # user 2 has no history
    x[3][1, 3:] = False  # user 1 is padded
    mask = x[3]
    x[1] = x[1] * mask[..., None, None]  # padding positions carry zeros / id 0,
    x[2] = x[2] * mask[..., None]  # as the feature store writes them
    x[6] = torch.arange(10) % 3
    return tuple(x)


def golden_tower_batch(model: CameNN | EM3) -> tuple[torch.Tensor, ...]:
    """Items with text and image, text only, image only, neither; text padded to
    ``max_text_len``, as the embedding job sends it."""
    cfg = model.cfg
    text, _, image, _ = item_tower_example(model, i=6, lt=cfg.max_text_len, seed=1)
    text_len = torch.tensor([cfg.max_text_len, 1, 0, max(1, cfg.max_text_len // 2), 0, 2])
    text_len = text_len.clamp(max=cfg.max_text_len)
    has_image = torch.tensor([True, False, True, True, False, True])
    text = text * (torch.arange(text.shape[1])[None, :] < text_len[:, None])[..., None]
    return text, text_len, image, has_image


def _run_module(
    module: nn.Module, names: tuple[str, ...], x: tuple[torch.Tensor, ...]
) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(*x)
    outs = out if isinstance(out, tuple) else (out,)
    return {n: _np(o) for n, o in zip(names, outs, strict=True)}


def export_run(
    run: Path,
    out: Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    version: str | None = None,
    force: bool = False,
) -> Manifest:
    """Export ``run`` into a new model repository at ``out``; returns its manifest.
    Refuses an existing ``out`` unless ``force`` (then replaces it)."""
    from training.runs import load_run  # torch + models; kept out of module import time

    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    name, model, meta = load_run(Path(run))
    if not isinstance(model, CameNN | EM3):
        raise ValueError(f"only camenn and em3 runs export; {run} holds {name!r}")
    model.eval()
    cfg = model.cfg
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = _write_repository(Path(run), tmp, name, model, meta, fp16, opset, version)
        open_repository(tmp)  # the checks a server runs, before the repository appears
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("exported %s (%s) to %s", name, getattr(cfg, "attention", "-"), out)
    return manifest


def _write_repository(
    run: Path,
    root: Path,
    name: str,
    model: CameNN | EM3,
    meta: dict[str, Any],
    fp16: bool,
    opset: int,
    version: str | None,
) -> Manifest:
    cfg = model.cfg
    attention = model.cfg.attention if isinstance(model, CameNN) else None
    shutil.copyfile(run / "model.safetensors", root / REFERENCE_WEIGHTS)
    shutil.copyfile(run / "config.json", root / REFERENCE_CONFIG)
    version = version or sha256_file(root / REFERENCE_WEIGHTS)[:12]
    max_hist = model.cfg.history_limit
    r_in, r_out = _ranker_specs(model)
    t_in, t_out = _tower_specs(model)
    t_names = item_tower_outputs(model)
    kinds = {
        RANKER: (
            RankerGraph,
            RANKER_INPUTS,
            RANKER_OUTPUTS,
            r_in,
            r_out,
            RANKER_AXES,
            ranker_example(model),
            ranker_dynamic_shapes(max_hist),
            golden_ranker_batch(model),
        ),
        ITEM_TOWER: (
            ItemTowerGraph,
            ITEM_TOWER_INPUTS,
            t_names,
            t_in,
            t_out,
            ITEM_TOWER_AXES,
            item_tower_example(model),
            item_tower_dynamic_shapes(cfg.max_text_len),
            golden_tower_batch(model),
        ),
    }
    graphs: dict[str, GraphSpec] = {}
    configs: dict[str, dict[str, str]] = {RANKER: {}, ITEM_TOWER: {}}
    for base, (cls, inputs, outputs, ins, outs, axes, example, dyn, golden) in kinds.items():
        for precision in ("float32", "float16") if fp16 else ("float32",):
            half = precision == "float16"
            key = f"{base}_fp16" if half else base
            fname = "model.fp16.onnx" if half else "model.onnx"
            rel = f"{base}/1/{fname}"
            module = cls(model, half=half)
            desc = f"mmrank {name} {base} ({attention or 'em3'}, {precision}), version {version}"
            _export_graph(
                module,
                example,
                dyn,
                inputs,
                outputs,
                (*ins, *outs),
                opset,
                root / rel,
                {
                    "mmrank.model": name,
                    "mmrank.graph": base,
                    "mmrank.version": version,
                    "mmrank.precision": precision,
                    "mmrank.description": desc,
                },
            )
            # the golden batch: reference outputs always from the float32 PyTorch model
            want = _run_module(cls(model), outputs, golden)
            gold_rel = f"golden_{key}.npz"
            arrays = {f"in.{n}": _np(t) for n, t in zip(inputs, golden, strict=True)}
            arrays |= {f"out.{n}": v for n, v in want.items()}
            cast(Any, np.savez)(root / gold_rel, **arrays)
            diff = _ort_diff(root / rel, inputs, golden, want)
            tol = TOLERANCE[precision]
            if not diff <= tol:
                raise ExportError(
                    f"{rel}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                    f"on the golden batch (tolerance {tol:g})"
                )
            graphs[key] = GraphSpec(rel, base, precision, ins, outs, axes, tol, diff, gold_rel)
            configs[base][precision] = fname
    for base, files in configs.items():
        header = f"mmrank {name} {base}, version {version}; written by `mmrank export`."
        if base == RANKER:
            header += (
                "\nmax_batch_size 0: requests are multi-user batches (model_export/triton.py)."
            )
        cpu = render_config(base, graphs[base], model_filename=files["float32"], header=header)
        (root / base / "config.pbtxt").write_text(cpu)
        gpu = render_config(
            base,
            graphs[base],
            gpu=True,
            header=header,
            model_filename=files.get("float16", files["float32"]),
        )
        (root / base / "configs").mkdir(exist_ok=True)
        (root / base / "configs" / "gpu.pbtxt").write_text(gpu)
    files_sha = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    metrics_path = run / "metrics.json"
    training = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    training.pop("history", None)
    users, items, note = field_names(str(meta.get("data", "")), cfg.user_buckets, cfg.item_buckets)
    import onnxscript

    manifest = Manifest(
        name=f"{name}-{attention}" if attention else name,
        version=version,
        model=name,
        attention=attention,
        q=cfg.q,
        d=cfg.d,
        max_hist=max_hist,
        opset=opset,
        user_fields=users,
        item_fields=items,
        hashing=HASHING,
        item_content={
            "text_dim": cfg.text_dim,
            "image_dim": cfg.image_dim,
            "max_text_len": cfg.max_text_len,
            "n_patches": cfg.n_patches,
        },
        item_record=item_record_json(cfg.q, cfg.d, len(items), isinstance(model, CameNN)),
        alignment=isinstance(model, CameNN),
        graphs=graphs,
        files=files_sha,
        training={**training, "data": meta.get("data"), "run": str(run.resolve())},
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        exporter={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
        },
        notes={"fields": note} if note else {},
    )
    (root / MANIFEST).write_text(manifest.dumps())
    return manifest


def _ort_diff(
    path: Path, inputs: tuple[str, ...], x: tuple[torch.Tensor, ...], want: dict[str, np.ndarray]
) -> float:
    sess = load_session(path, path.name, session_options(1, "disable"), None)
    names = [o.name for o in sess.get_outputs()]
    got = dict(
        zip(
            names, sess.run(names, {n: _np(t) for n, t in zip(inputs, x, strict=True)}), strict=True
        )
    )
    return max_abs_diff(got, want)
