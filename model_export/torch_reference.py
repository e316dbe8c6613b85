"""The PyTorch reference backend: the exported weights run in PyTorch eager, without
ONNX, through the same wrappers as the exported graphs (:mod:`model_export.graphs`).

Exporting side (imports torch and the models). The service can run it beside ONNX
Runtime to compare backends; the parity tests use it as the ground truth.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import load_file

from model_export.errors import ManifestError
from model_export.export import REFERENCE_CONFIG, REFERENCE_WEIGHTS
from model_export.graphs import (
    ItemTowerGraph,
    RankerGraph,
    item_tower_outputs,
)
from model_export.manifest import ITEM_TOWER_INPUTS, RANKER_INPUTS
from model_export.repository import read_manifest, verify_files
from models.camenn import CameNN
from models.em3 import EM3
from training.runs import model_from_config


class TorchReference:
    """``rank`` and ``embed`` on numpy feeds keyed like the ONNX graphs' inputs;
    outputs are float32 numpy arrays, as ONNX Runtime returns them."""

    def __init__(self, model: CameNN | EM3, threads: int | None = None) -> None:
        self.model = model.eval()
        self.ranker = RankerGraph(model)
        self.tower = ItemTowerGraph(model)
        self.tower_outputs = item_tower_outputs(model)
        self.threads = threads

    @classmethod
    def from_repository(cls, root: Path | str, threads: int | None = None) -> TorchReference:
        """Load the repository's reference weights after checking their sha256."""
        root = Path(root)
        manifest = read_manifest(root)
        verify_files(root, manifest)
        for f in (REFERENCE_WEIGHTS, REFERENCE_CONFIG):
            if f not in manifest.files:
                raise ManifestError(f"manifest.json lists no {f}: no PyTorch reference")
        meta = json.loads((root / REFERENCE_CONFIG).read_text())
        if meta["model"] not in ("camenn", "em3"):
            raise ManifestError(f"{REFERENCE_CONFIG}: unknown model {meta['model']!r}")
        model = cast(CameNN | EM3, model_from_config(meta["model"], meta["config"]))
        model.load_state_dict(load_file(str(root / REFERENCE_WEIGHTS)))
        return cls(model, threads)

    def _run(
        self, module: torch.nn.Module, names: tuple[str, ...], feeds: Mapping[str, np.ndarray]
    ) -> tuple[torch.Tensor, ...]:
        missing = [n for n in names if n not in feeds]
        if missing:
            raise KeyError(f"missing inputs {missing}")
        prev = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)  # restored below: no process-wide side effect
        try:
            with torch.no_grad():
                out = module(*(torch.from_numpy(np.asarray(feeds[n])) for n in names))
        finally:
            torch.set_num_threads(prev)
        return out if isinstance(out, tuple) else (out,)

    def rank(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """``cvr`` (B,) float32 for the DESIGN section 3 tensors in ``feeds``."""
        return self._run(self.ranker, RANKER_INPUTS, feeds)[0].numpy()

    def embed(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``emb`` (and ``ita``/``tia`` for CameNN) for item content in ``feeds``."""
        outs = self._run(self.tower, ITEM_TOWER_INPUTS, feeds)
        return {n: o.numpy() for n, o in zip(self.tower_outputs, outs, strict=True)}
