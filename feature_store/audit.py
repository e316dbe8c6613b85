"""Alignment audit: the items whose ITA/TIA scores say their text and image disagree
(the papers' dirty listings), as CSV rows sorted most suspicious first.

Only items with both a text and an image and with alignment scores are judged (EM3's
records carry none: the audit refuses them). An item is flagged when its ITA or TIA
probability is below ``threshold``: ``ita`` low = this text is not this image's own;
``tia`` low = this image is not this text's own.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping

import numpy as np

from feature_store.embed import Embeddings

COLUMNS = ("item_id", "ita", "tia", "flag", "description")


def audit_rows(e: Embeddings, threshold: float = 0.5,
               descriptions: Mapping[str, str] | None = None) -> list[dict[str, object]]:  # fmt: skip
    """Flagged items, most suspicious (lowest min(ita, tia)) first."""
    if not e.meta.get("alignment"):
        raise ValueError(f"model {e.meta.get('model_name')} has no ITA/TIA heads: nothing to audit")
    judged = e.has_text & e.has_image & np.isfinite(e.ita) & np.isfinite(e.tia)
    low_i, low_t = e.ita < threshold, e.tia < threshold
    flagged = np.flatnonzero(judged & (low_i | low_t))
    flagged = flagged[np.argsort(np.minimum(e.ita, e.tia)[flagged], kind="stable")]
    rows = []
    for k in flagged.tolist():
        iid = str(e.item_ids[k])
        flag = "both" if low_i[k] and low_t[k] else ("ita" if low_i[k] else "tia")
        rows.append({
            "item_id": iid,
            "ita": round(float(e.ita[k]), 4),
            "tia": round(float(e.tia[k]), 4),
            "flag": flag,
            "description": (descriptions or {}).get(iid, ""),
        })  # fmt: skip
    return rows


def judged_count(e: Embeddings) -> int:
    return int((e.has_text & e.has_image & np.isfinite(e.ita) & np.isfinite(e.tia)).sum())


def to_csv(rows: list[dict[str, object]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
