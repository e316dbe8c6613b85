"""A synthetic retail world with known ground truth (DESIGN section 9).

Items have latent attributes (fine category, style, quality); their text tokens and
image patches are generated from those attributes with noise, the way word
embeddings and CNN patch features carry them. A share of items has a planted
text/image mismatch: its text (or image) was generated from another category, the
papers' "dirty listings". Users have latent category and style preferences and a
quality sensitivity, observable only through a history of bought items and weakly
through their profile fields. Each request shows a user a few candidates chosen by a
matching stage; conversion is drawn from a known ``p_true``:

    logit = base + a_p * pref[u, cat[i]] + a_s * style_pref[u, style[i]]
            + a_q * beta[u] * quality[i] + item_bias[i] + user_bias[u]
            + slot_effect[slot, coarse[i]]

Users have three favourite categories and one favourite style (their histories are
drawn mostly from those), so a long enough history identifies them; cold-start users
have no history and only their (age, gender) segment's lean. A user is known to the
ranker by profile, context and history, not by an id embedding: with ~100 labelled
candidates per user an id table memorises noise (measured on a low-noise variant:
EM3 test AUC 0.756 with a user-id field, 0.773 without).

Word vectors of one category (or style) share a direction, as pretrained text
embeddings place related words together (``word_cohesion``); every token and patch
still carries noise of the same size as the signal.

The retailer's categorical fields only carry the *coarse* category (4 groups of 4
fine ones) and the brand (a noisy quality proxy), so a content-blind model cannot
see fine category, style or most of quality. Item popularity is Zipf-like, so tail
items have too few interactions for their ids to be memorised.

Files (``mmrank world``): ``items.parquet``, ``users.parquet``,
``interactions.parquet``; ids are strings; columns prefixed ``true_`` hold latent
truth for evaluation and are never model inputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.dataset import Catalog, FieldSpec, RankingData, Split
from mmrank.features import hash_column

SPLITS = ("train", "valid", "test")
ITEM_FIELDS = (
    FieldSpec("item_id", 20011),
    FieldSpec("coarse_category", 17),
    FieldSpec("brand", 211),
)
USER_FIELDS = (
    FieldSpec("age", 11),
    FieldSpec("gender", 5),
    FieldSpec("region", 17),
    FieldSpec("slot", 7),
    FieldSpec("device", 5),
)


@dataclass
class WorldConfig:
    seed: int = 0
    n_users: int = 1500  # ~6 requests of ~10 candidates each -> ~80k labelled candidates
    n_items: int = 1500  # Zipf popularity: a long tail ids cannot memorise
    n_categories: int = 16  # fine categories: visible only in content
    n_coarse: int = 4  # coarse groups of fine categories: a categorical field
    n_styles: int = 6  # visible only in content
    n_brands: int = 60  # brand field: a noisy proxy of quality
    text_dim: int = 32  # stands in for BERT token embeddings
    image_dim: int = 32  # stands in for CNN patch features
    max_text_len: int = 50  # CameNN: at most 50 text tokens
    n_patches: int = 9  # 3 x 3 image patches
    word_cohesion: float = 0.7  # cosine of a category/style word to its group's direction
    token_noise: float = 0.5  # per-token noise (word vectors have norm ~2.8)
    patch_noise: float = 0.7  # per-patch noise
    shape_cohesion: float = 0.7  # cosine of a category's patch features to its common direction
    # descriptions that open with a title naming the product type ("Siri cardigan. ..."),
    # a category word with half the body's noise (titles are curated, not free text)
    title_rate: float = 1.0
    title_noise: float = 0.25
    mismatch_rate: float = 0.10  # planted text/image mismatch (dirty listings)
    no_image_rate: float = 0.05  # listings without a photo (masked)
    no_text_rate: float = 0.02  # listings without a description (masked)
    min_history: int = 20  # bought items per user: uniform in [min_history, max_history] ...
    max_history: int = 50
    cold_user_rate: float = 0.03  # ... except cold-start users, who have none
    history_focus: float = 3.0  # how strongly purchases follow preference (vs. chance)
    pref_noise: float = 0.05  # spread of the affinity to non-favourite categories and styles
    beta_sd: float = 0.1  # spread of users' quality sensitivity around 1
    requests_per_user: float = 5.0  # Poisson mean (+1)
    cands_per_request: int = 20  # one page of results
    matched_share: float = 0.6  # candidates drawn by preference (a matching stage) vs popularity
    zipf: float = 1.0  # item popularity exponent
    base_logit: float = -2.8  # sets the conversion rate (~0.15-0.2)
    pref_scale: float = 0.8  # user x fine-category affinity
    style_scale: float = 0.6  # user x style affinity
    quality_scale: float = 0.6  # quality, weighed by the user's sensitivity
    item_bias_sd: float = 0.1  # id effects: what memorising ids can add
    user_bias_sd: float = 0.1
    slot_sd: float = 0.3
    valid_share: float = 0.1
    test_share: float = 0.1


def _words(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    w = rng.normal(size=(n, dim))
    return (w / np.linalg.norm(w, axis=1, keepdims=True) * np.sqrt(dim) / 2).astype(np.float32)


def _related_words(rng: np.random.Generator, groups: int, per_group: int, dim: int,
                   cohesion: float) -> np.ndarray:  # fmt: skip
    """(groups, per_group, dim) word vectors; words of one group share a direction with
    cosine ~``cohesion`` to it, as pretrained embeddings place related words together."""
    centre = _words(rng, groups, dim)[:, None, :]
    own = _words(rng, groups * per_group, dim).reshape(groups, per_group, dim)
    return (cohesion * centre + np.sqrt(1 - cohesion**2) * own).astype(np.float32)


class _Generator:
    """Holds the world's latent parameters; draws content, users and conversions."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        # titles draw from their own stream, so every other draw of a seed's world (and
        # so p_true, the interactions and the splits) does not depend on ``title_rate``
        self.title_rng = np.random.default_rng([cfg.seed, 1])
        c, rng = cfg, self.rng
        # vocabulary: 8 words per category, 6 per style, 6 premium, 6 budget, 300 filler
        self.cat_words = _related_words(rng, c.n_categories, 8, c.text_dim, c.word_cohesion)
        self.style_words = _related_words(rng, c.n_styles, 6, c.text_dim, c.word_cohesion)
        self.premium_words = _words(rng, 6, c.text_dim)
        self.budget_words = _words(rng, 6, c.text_dim)
        self.filler_words = _words(rng, 300, c.text_dim)
        # visual prototypes: a shape per category (per patch, sharing the object's
        # direction, as CNN features of one object do), a colour per style
        self.cat_shapes = (
            _related_words(rng, c.n_categories, c.n_patches, c.image_dim, c.shape_cohesion) * 0.8
        )
        self.style_colours = _words(rng, c.n_styles, c.image_dim) * 0.6
        self.quality_dir = _words(rng, 1, c.image_dim)[0] * 0.5

    # -- items -----------------------------------------------------------------------
    def text(self, cat: int, style: int, quality: float) -> np.ndarray:
        c, rng = self.cfg, self.rng
        # description lengths: mostly short, a tail up to the cap
        n = int(np.clip(rng.lognormal(np.log(18), 0.5), 6, c.max_text_len))
        kind = rng.choice(4, size=n, p=[0.25, 0.15, 0.10, 0.50])
        toks = np.empty((n, c.text_dim), dtype=np.float32)
        for t, k in enumerate(kind):
            if k == 0:
                toks[t] = self.cat_words[cat, rng.integers(8)]
            elif k == 1:
                toks[t] = self.style_words[style, rng.integers(6)]
            elif k == 2 and quality + rng.normal(0, 0.7) > 0.4:
                toks[t] = self.premium_words[rng.integers(6)]
            elif k == 2 and quality + rng.normal(0, 0.7) < -0.4:
                toks[t] = self.budget_words[rng.integers(6)]
            else:
                toks[t] = self.filler_words[rng.integers(300)]
        toks = toks + rng.normal(0, c.token_noise, size=toks.shape).astype(np.float32)
        if self.title_rng.random() < c.title_rate:  # "Siri cardigan. Cardigan in a soft knit"
            title = self.cat_words[cat, self.title_rng.integers(8)]
            toks[0] = title + self.title_rng.normal(0, c.title_noise, size=title.shape)
        return toks

    def image(self, cat: int, style: int, quality: float) -> np.ndarray:
        c, rng = self.cfg, self.rng
        scale = rng.uniform(0.4, 1.2)  # how much of the frame the product fills
        img = self.cat_shapes[cat] * scale + self.style_colours[style] + quality * self.quality_dir
        return (img + rng.normal(0, c.patch_noise, size=img.shape)).astype(np.float32)

    def items(self) -> dict[str, np.ndarray]:
        c, rng = self.cfg, self.rng
        n = c.n_items
        cat_pop = rng.dirichlet(np.full(c.n_categories, 3.0))
        cat = rng.choice(c.n_categories, size=n, p=cat_pop)
        style = rng.integers(c.n_styles, size=n)
        brand = rng.integers(c.n_brands, size=n)
        brand_quality = rng.normal(0, 0.6, size=c.n_brands)
        quality = brand_quality[brand] + rng.normal(0, 0.8, size=n)
        mismatch = np.where(rng.random(n) < c.mismatch_rate, rng.choice([1, 2], size=n), 0)
        other = (cat + rng.integers(1, c.n_categories, size=n)) % c.n_categories
        no_image = rng.random(n) < c.no_image_rate
        no_text = (rng.random(n) < c.no_text_rate) & ~no_image
        mismatch[no_image | no_text] = 0  # a missing modality cannot disagree
        text = np.zeros((n, c.max_text_len, c.text_dim), dtype=np.float32)
        text_len = np.zeros(n, dtype=np.int64)
        image = np.zeros((n, c.n_patches, c.image_dim), dtype=np.float32)
        for i in range(n):
            t_cat = other[i] if mismatch[i] == 1 else cat[i]
            i_cat = other[i] if mismatch[i] == 2 else cat[i]
            if not no_text[i]:
                toks = self.text(t_cat, style[i], quality[i])
                text[i, : len(toks)] = toks
                text_len[i] = len(toks)
            if not no_image[i]:
                image[i] = self.image(i_cat, style[i], quality[i])
        popularity = 1.0 / np.arange(1, n + 1) ** c.zipf
        return {
            "cat": cat, "style": style, "brand": brand, "quality": quality,
            "mismatch": mismatch, "text": text, "text_len": text_len, "image": image,
            "has_image": ~no_image, "bias": rng.normal(0, c.item_bias_sd, size=n),
            "popularity": rng.permutation(popularity / popularity.sum()),
        }  # fmt: skip

    # -- users -----------------------------------------------------------------------
    def users(self) -> dict[str, np.ndarray]:
        c, rng = self.cfg, self.rng
        n = c.n_users
        age = rng.integers(6, size=n)
        gender = rng.integers(2, size=n)
        region = rng.integers(8, size=n)
        # each (age, gender) segment leans towards some categories, so profile fields are
        # weakly informative; each user has a few favourite categories, which a history
        # of bought items reveals
        segment_pref = rng.normal(0, 1.0, size=(12, c.n_categories))
        raw = segment_pref[age * 2 + gender] + rng.normal(0, 1.0, size=(n, c.n_categories))
        favourites = np.argsort(-raw - rng.gumbel(size=raw.shape), axis=1)[:, :3]
        pref = rng.normal(0, c.pref_noise, size=(n, c.n_categories))
        np.put_along_axis(pref, favourites, np.array([[1.5, 1.5, 1.5]]), axis=1)
        pref = (pref - pref.mean(axis=1, keepdims=True)) / pref.std(axis=1, keepdims=True)
        return {
            "age": age, "gender": gender, "region": region, "pref": pref,
            "style": self.style_pref(n),
            "beta": rng.normal(1.0, c.beta_sd, size=n), "bias": rng.normal(0, c.user_bias_sd, size=n),
        }  # fmt: skip

    def style_pref(self, n: int) -> np.ndarray:
        """Each user has one favourite style and mild feelings about the others."""
        c, rng = self.cfg, self.rng
        style = rng.normal(0, c.pref_noise, size=(n, c.n_styles))
        style[np.arange(n), rng.integers(c.n_styles, size=n)] += 1.5
        return (style - style.mean(axis=1, keepdims=True)) / style.std(axis=1, keepdims=True)

    def affinity(self, users: dict[str, np.ndarray], items: dict[str, np.ndarray],
                 u: np.ndarray, i: np.ndarray) -> np.ndarray:  # fmt: skip
        """User-item content affinity (no ids, no context); (n,)."""
        c = self.cfg
        return (
            c.pref_scale * users["pref"][u, items["cat"][i]]
            + c.style_scale * users["style"][u, items["style"][i]]
            + c.quality_scale * users["beta"][u] * items["quality"][i]
        )


def generate(cfg: WorldConfig) -> dict[str, pa.Table]:
    """Draw a world; returns the three tables ``mmrank world`` writes."""
    g = _Generator(cfg)
    rng = g.rng
    items, users = g.items(), g.users()
    n_u, n_i = cfg.n_users, cfg.n_items
    all_items = np.arange(n_i)
    slot_effect = rng.normal(0, cfg.slot_sd, size=(4, cfg.n_coarse))
    coarse = items["cat"] // (cfg.n_categories // cfg.n_coarse)

    histories: list[list[str]] = []
    rows: dict[str, list[object]] = {k: [] for k in
        ("user_id", "item_id", "request_id", "slot", "device", "label", "p_true", "split")}  # fmt: skip
    log_pop = np.log(items["popularity"])
    req_no = 0
    for u in range(n_u):
        aff = g.affinity(users, items, np.full(n_i, u), all_items)
        # history: bought items, chosen by preference and popularity (no replacement)
        cold = rng.random() < cfg.cold_user_rate
        n_hist = 0 if cold else int(rng.integers(cfg.min_history, cfg.max_history + 1))
        buy_w = cfg.history_focus * aff + 0.5 * log_pop + rng.gumbel(size=n_i)
        hist = rng.permutation(np.argsort(-buy_w)[:n_hist])  # purchase order: oldest first
        histories.append([f"i{j}" for j in hist])
        n_req = 1 + int(rng.poisson(cfg.requests_per_user))
        for _ in range(n_req):
            k = cfg.cands_per_request
            n_match = int(rng.binomial(k, cfg.matched_share))
            match_w = 0.5 * aff + log_pop + rng.gumbel(size=n_i)  # a matching stage
            cands = list(np.argsort(-match_w)[:n_match])
            cands += list(rng.choice(n_i, size=k - n_match, p=items["popularity"]))
            cands_arr = np.unique(np.asarray(cands, dtype=np.int64))
            slot, device = int(rng.integers(4)), int(rng.integers(3))
            logit = (
                cfg.base_logit
                + aff[cands_arr]
                + items["bias"][cands_arr]
                + users["bias"][u]
                + slot_effect[slot, coarse[cands_arr]]
            )
            p = 1.0 / (1.0 + np.exp(-logit))
            split = rng.choice(3, p=[1 - cfg.valid_share - cfg.test_share, cfg.valid_share,
                                     cfg.test_share])  # fmt: skip
            for j, pj in zip(cands_arr, p, strict=True):
                rows["user_id"].append(f"u{u}")
                rows["item_id"].append(f"i{j}")
                rows["request_id"].append(f"r{req_no}")
                rows["slot"].append(slot)
                rows["device"].append(device)
                rows["p_true"].append(float(pj))
                rows["label"].append(int(rng.random() < pj))
                rows["split"].append(SPLITS[split])
            req_no += 1

    item_table = pa.table({
        "item_id": [f"i{j}" for j in range(n_i)],
        "coarse_category": coarse.astype(np.int64),
        "brand": items["brand"].astype(np.int64),
        "text": pa.array(list(items["text"].reshape(n_i, -1)), type=pa.list_(pa.float32())),
        "text_len": items["text_len"],
        "image": pa.array(list(items["image"].reshape(n_i, -1)), type=pa.list_(pa.float32())),
        "has_image": items["has_image"],
        "true_category": items["cat"].astype(np.int64),
        "true_style": items["style"].astype(np.int64),
        "true_quality": items["quality"].astype(np.float32),
        "true_mismatch": pa.array(np.array(["none", "text", "image"])[items["mismatch"]]),
    })  # fmt: skip
    user_table = pa.table({
        "user_id": [f"u{u}" for u in range(n_u)],
        "age": users["age"].astype(np.int64),
        "gender": users["gender"].astype(np.int64),
        "region": users["region"].astype(np.int64),
        "history": pa.array(histories, type=pa.list_(pa.string())),
    })  # fmt: skip
    inter_table = pa.table({k: pa.array(v) for k, v in rows.items()})
    meta = {"config": json.dumps(asdict(cfg))}
    return {
        "items": item_table.replace_schema_metadata(meta),
        "users": user_table.replace_schema_metadata(meta),
        "interactions": inter_table.replace_schema_metadata(meta),
    }


def write_world(cfg: WorldConfig, out: Path) -> dict[str, int]:
    """Generate and write the world; returns row counts per table."""
    out.mkdir(parents=True, exist_ok=True)
    tables = generate(cfg)
    for name, table in tables.items():
        pq.write_table(table, out / f"{name}.parquet")
    (out / "world.json").write_text(json.dumps(asdict(cfg), indent=2))
    return {name: t.num_rows for name, t in tables.items()}


def load_world(path: Path, max_hist: int = 50) -> RankingData:
    """Read a world written by :func:`write_world` into the training form; rows are
    requests (user + context + history), candidates their shown items."""
    items = pq.read_table(path / "items.parquet").to_pydict()
    users = pq.read_table(path / "users.parquet").to_pydict()
    inter = pq.read_table(path / "interactions.parquet")
    cfg = json.loads((path / "world.json").read_text())
    n_i = len(items["item_id"])
    text_len = np.asarray(items["text_len"], dtype=np.int64)
    text = np.asarray(items["text"], dtype=np.float32).reshape(
        n_i, cfg["max_text_len"], cfg["text_dim"]
    )
    image = np.asarray(items["image"], dtype=np.float32).reshape(
        n_i, cfg["n_patches"], cfg["image_dim"]
    )
    item_index = {iid: k for k, iid in enumerate(items["item_id"])}
    catalog = Catalog(
        item_ids=np.asarray(items["item_id"]),
        text=text,
        text_len=text_len,
        image=image,
        has_image=np.asarray(items["has_image"], dtype=bool),
        sparse=np.stack([hash_column(f.name, items[f.name], f.buckets) for f in ITEM_FIELDS], 1),
        fields=ITEM_FIELDS,
        mismatch=np.asarray(items["true_mismatch"]) != "none",
        kind_field="coarse_category",
    )
    user_index = {uid: k for k, uid in enumerate(users["user_id"])}
    hist = np.full((len(user_index), max_hist), -1, dtype=np.int64)
    for k, h in enumerate(users["history"]):
        h = [item_index[x] for x in h][::-1][:max_hist]  # most recent first
        hist[k, : len(h)] = h
    splits = {}
    for name in SPLITS:
        t = inter.filter(pa.compute.equal(inter["split"], name)).to_pydict()
        req = np.asarray(t["request_id"])
        order = np.argsort(req, kind="stable")
        req = req[order]
        first = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
        col = {k: np.asarray(v)[order] for k, v in t.items()}
        u_rows = np.array([user_index[x] for x in col["user_id"][first]])
        usparse = {
            "age": np.asarray(users["age"])[u_rows],
            "gender": np.asarray(users["gender"])[u_rows],
            "region": np.asarray(users["region"])[u_rows],
            "slot": col["slot"][first],
            "device": col["device"][first],
        }
        splits[name] = Split(
            user_sparse=np.stack(
                [hash_column(f.name, usparse[f.name], f.buckets) for f in USER_FIELDS], 1
            ),
            hist=hist[u_rows],
            offsets=np.r_[first, len(req)].astype(np.int64),
            cand_item=np.array([item_index[x] for x in col["item_id"]], dtype=np.int64),
            label=col["label"].astype(np.float32),
            p_true=col["p_true"].astype(np.float32),
            row_user=u_rows.astype(np.int64),
        )
    return RankingData("world", catalog, USER_FIELDS, splits["train"], splits["valid"],
                       splits["test"], has_oracle=True)  # fmt: skip
