"""Read a directory of MHSA sample pickles as the MHSA code writes them.

The MHSA code (Hong et al. 2022, repository ``mie-lab/location-prediction``) writes one pickle per
split and history length, ``{dataset}_{model}_{previous_day}_{split}.pk`` with split ``train``,
``validation``, ``test`` (e.g. ``geolife_transformer_7_train.pk``), into ``data/temp/``.  Each is a
list of dicts (see :mod:`~hsoftmax.data.samples`); ``dur_X`` is float64 there, which
:meth:`~hsoftmax.data.samples.SampleSet.from_mhsa` accepts as long as it holds whole numbers.
``hsoftmax data samples`` writes ``{prefix}{split}.pk`` plus ``{prefix}meta.json``,
``{prefix}vocab_locations.csv`` and ``{prefix}vocab_users.csv``.

**Variants.**  The pickles of one directory are grouped by their name without the split
(``geolife_transformer_7``); the number after the last ``_`` of an MHSA name
``{dataset}_{model}_{n}`` is its ``previous_day``.  One variant is used: the only one, or the one
whose ``previous_day`` is asked for; otherwise the error lists the variants found.

**Location ids and coordinates.**  MHSA encodes location ids with scikit-learn's
``OrdinalEncoder`` fitted on the training split's staypoints (``_encode_loc`` in
``utils/dataloader.py``): its categories are the *sorted* distinct original ids, so encoded id
``k >= 2`` is the ``(k-2)``-th smallest original location id among the training stays, ``1`` is
a location not seen in training and ``0`` padding.  The pickles hold only encoded ids, so the map
back to original ids -- and hence coordinates -- is recovered from a file beside them, in this
order (the first that exists is used):

1. ``{prefix}vocab_locations.csv`` (written by ``hsoftmax data samples``): the map itself.
2. MHSA's staypoint table ``dataSet_{dataset}.csv`` (``preprocessing/geolife.py`` writes it to
   ``data/``, the parent of ``data/temp/``; columns ``user_id``, ``location_id``, ``start_day``):
   the training split is recomputed from it as MHSA's dataloader does (per user, stays with
   ``start_day < max start_day * split[0]``; ``split`` defaults to MHSA's 0.6/0.2/0.2) and the
   encoder refitted.  The result is checked against the pickles: every (split, user, encoded
   location) of a pickle must occur in the recomputed table, else a :class:`DataFormatError`.
3. Only a location table (trackintel's ``locations.csv`` or MHSA's ``locations_{dataset}.csv``):
   the encoder is *assumed* to have been fitted on exactly the ids of that table, which holds only
   when the table lists the training locations and nothing else.  The assumption is used only when
   the counts agree (distinct ids + 2 = ``V``) and is logged as a warning; MHSA's own
   ``locations_geolife.csv`` also lists locations seen only in validation/test or only by
   dropped users, so with it the counts differ and no coordinates are taken.

Coordinates are then matched by original location id in the location table (``center``, WKT, or
``lat``/``lon``) found beside the pickles.  When there are none, ``MobilityData.has_coordinates``
is false and ``info["coordinates"]`` says why.

**User ids.**  MHSA renumbers users ``1..N`` itself (``OrdinalEncoder`` on the kept users, + 1)
before writing its staypoint table, so the original ids are in none of its outputs; the pickles'
user ids are kept as they are (``info["original_user_ids"]`` is false).  With
``{prefix}vocab_users.csv`` (written by ``hsoftmax data samples``) the originals are restored.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .samples import SPLITS, UNSEEN, MobilityData, SampleSet, _split_of, load_mhsa
from .staypoints import DataFormatError, _int_column, _read_csv, read_locations

__all__ = [
    "MHSA_SPLIT",
    "MhsaVariant",
    "find_mhsa_variants",
    "select_mhsa_variant",
    "load_mhsa_dir",
]

logger = logging.getLogger("hsoftmax.data")

# the per-user day split MHSA's dataloader hard-codes (0.6 / 0.8 of each user's last day)
MHSA_SPLIT = (0.6, 0.2, 0.2)
# ``validation`` is MHSA's name; ``valid`` is what the earlier glob ``*valid*.pk`` matched
_SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "test": "test"}
_PICKLE = re.compile(r"^(?P<prefix>.*?)(?P<split>train|validation|valid|test)\.pk$")


@dataclass
class MhsaVariant:
    """One set of split pickles in a directory.

    ``name``: file name without the split (``geolife_transformer_7``; ``""`` for ``train.pk``);
    ``prefix``: the literal file-name prefix (``geolife_transformer_7_``); ``dataset`` and
    ``previous_day``: parsed from an MHSA name ``{dataset}_{model}_{previous_day}``, else None;
    ``files``: split name -> path (a split may be missing).
    """

    name: str
    prefix: str
    dataset: str | None = None
    previous_day: int | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def describe(self) -> str:
        """``name (previous_day 7)`` or ``name`` for the error messages."""
        label = self.name or "(no prefix)"
        if self.previous_day is not None:
            label += f" (previous_day {self.previous_day})"
        missing = [s for s in SPLITS if s not in self.files]
        if missing:
            label += f" [no {'/'.join(missing)}]"
        return label


def find_mhsa_variants(directory: str | os.PathLike) -> list[MhsaVariant]:
    """The pickle sets in ``directory`` (sorted by name); each may lack splits.

    Raises :class:`DataFormatError` when one variant has two files for the same split
    (``x_valid.pk`` and ``x_validation.pk``).
    """
    d = Path(directory)
    variants: dict[str, MhsaVariant] = {}
    for p in sorted(d.glob("*.pk")):
        m = _PICKLE.match(p.name)
        if not m:
            continue
        prefix = m["prefix"]
        name = prefix[:-1] if prefix.endswith(("_", "-", ".")) else prefix
        v = variants.get(name)
        if v is None:
            parts = name.split("_")
            # MHSA: {dataset}_{model}_{previous_day}; a dataset name may itself hold "_"
            mhsa = len(parts) >= 3 and parts[-1].isdigit()
            v = variants[name] = MhsaVariant(
                name=name,
                prefix=prefix,
                dataset="_".join(parts[:-2]) if mhsa else None,
                previous_day=int(parts[-1]) if mhsa else None,
            )
        split = _SPLIT_NAMES[m["split"]]
        if split in v.files:
            raise DataFormatError(
                f"{d}: two {split} pickles for sample set {v.name or '(no prefix)'!r}: "
                f"{v.files[split].name} and {p.name}"
            )
        v.files[split] = p
    return [variants[k] for k in sorted(variants)]


def select_mhsa_variant(
    variants: list[MhsaVariant], previous_day: int | None, directory: str | os.PathLike = ""
) -> MhsaVariant:
    """The variant to load: the only one, or the one with ``previous_day``.

    Raises :class:`DataFormatError` listing the variants found when none or several fit, or when
    the chosen one lacks a split.
    """
    found = ", ".join(v.describe() for v in variants)
    if not variants:
        raise DataFormatError(f"{directory}: no MHSA pickles (*_train.pk, ...) found")
    if previous_day is None:
        if len(variants) > 1:
            raise DataFormatError(
                f"{directory}: {len(variants)} MHSA sample sets found: {found}; choose one with "
                "data.previous_day"
            )
        chosen = variants[0]
    else:
        hits = [v for v in variants if v.previous_day == previous_day]
        if not hits and len(variants) == 1 and variants[0].previous_day is None:
            # a set without previous_day in its name: checked against the samples' diff later
            hits = variants
        if not hits:
            raise DataFormatError(
                f"{directory}: no MHSA sample set with previous_day={previous_day}; found: {found}"
            )
        if len(hits) > 1:
            raise DataFormatError(
                f"{directory}: {len(hits)} MHSA sample sets with previous_day={previous_day}: "
                f"{', '.join(v.describe() for v in hits)}; keep one of them in the directory"
            )
        chosen = hits[0]
    missing = [s for s in SPLITS if s not in chosen.files]
    if missing:
        names = ", ".join(f"{chosen.prefix}{s}.pk" for s in missing)
        raise DataFormatError(
            f"{directory}: MHSA sample set {chosen.name or '(no prefix)'!r} lacks its "
            f"{' and '.join(missing)} pickle ({names})"
        )
    return chosen


def _search_dirs(d: Path) -> list[Path]:
    """Where companions are looked for: the directory, and its parent when it is MHSA's
    ``temp`` folder (MHSA writes pickles to ``data/temp/``, tables to ``data/``)."""
    return [d, d.parent] if d.name == "temp" else [d]


def _find_file(dirs: list[Path], names: list[str]) -> Path | None:
    """The first existing ``dir/name`` (names compared case-insensitively, in order)."""
    for d in dirs:
        by_lower = {p.name.lower(): p for p in d.iterdir() if p.is_file()}
        for name in names:
            if name.lower() in by_lower:
                return by_lower[name.lower()]
    return None


def _read_meta(path: Path | None) -> int | None:
    """``n_locations`` from an ``hsoftmax data samples`` meta.json, validated."""
    if path is None:
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    n_loc = meta.get("n_locations") if isinstance(meta, dict) else None
    if isinstance(n_loc, bool) or not isinstance(n_loc, int) or n_loc < 2:
        raise DataFormatError(
            f"{path}: needs an integer n_locations >= 2 (the vocabulary size, padding id 0 "
            f"included), got {n_loc!r}"
        )
    return n_loc


def _read_vocab_locations(path: Path, n_loc: int) -> pd.DataFrame:
    """An ``hsoftmax data samples`` vocabulary table (``loc``, ``id``, ``lat``, ``lon``)."""
    table = pd.read_csv(path)
    missing = {"loc", "lat", "lon"} - set(table.columns)
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {sorted(missing)} (needs loc, lat, lon)")
    loc = pd.to_numeric(table["loc"], errors="coerce")
    bad = ~(loc.notna() & (loc == loc.round()) & (loc >= 0) & (loc < n_loc))
    if bool(bad.any()):
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFormatError(
            f"{path}: row {row}: loc {str(table['loc'].iloc[row])} is not a location id in "
            f"[0, {n_loc})"
        )
    return table.assign(loc=loc.astype(np.int64))


def _recover_vocab_from_table(
    table_path: Path, sets: dict[str, SampleSet], split: tuple[float, float, float]
) -> np.ndarray:
    """Sorted original ids of the training locations, refitted from MHSA's staypoint table and
    checked against the pickles (see the module docstring)."""
    raw = _read_csv(table_path)
    need = ["user_id", "location_id", "start_day"]
    missing = [c for c in need if c not in raw.columns]
    if missing:
        raise DataFormatError(
            f"{table_path}: missing column(s) {missing} of MHSA's staypoint table; found "
            f"{list(raw.columns)}"
        )
    user = _int_column(raw, "user_id", str(table_path))
    loc = _int_column(raw, "location_id", str(table_path))
    day = _int_column(raw, "start_day", str(table_path))
    _, ucode = np.unique(user, return_inverse=True)
    user_max = np.zeros(ucode.max() + 1, dtype=np.int64)
    np.maximum.at(user_max, ucode, day)
    split_id = _split_of(day, user_max[ucode], split)
    vocab = np.unique(loc[split_id == 0])
    v = len(vocab) + 2
    pos = np.searchsorted(vocab, loc).clip(0, len(vocab) - 1)
    enc = np.where(vocab[pos] == loc, pos + 2, UNSEEN)
    # every (split, user, location) the pickles hold must occur in the recomputed table
    n_users = int(max(user.max(), *(s.user.max() for s in sets.values()))) + 1
    table_keys = np.unique((split_id * n_users + user) * v + enc)
    for k, name in enumerate(SPLITS):
        s = sets[name]
        too_big = max(int(s.loc.max()), int(s.y.max()))
        if too_big >= v:
            raise DataFormatError(
                f"{table_path}: does not match the pickles: {name} holds location id "
                f"{too_big}, but the table's training split (split={split}) has only "
                f"{len(vocab)} locations (ids 2..{v - 1}); was it written with another split?"
            )
        users = np.concatenate([s.user, s.sample_user])
        locs = np.concatenate([s.loc, s.y])
        keys = (k * n_users + users) * v + locs
        bad = np.flatnonzero(~np.isin(keys, table_keys))
        if len(bad):
            b = bad[0]
            raise DataFormatError(
                f"{table_path}: does not match the pickles: user {int(users[b])} has location "
                f"id {int(locs[b])} in the {name} pickle, but no {name} stay there after the "
                f"split {split} ({len(bad)} such entries); was it written with another split?"
            )
    return vocab


def load_mhsa_dir(
    directory: str | os.PathLike,
    previous_day: int | None = None,
    split: tuple[float, float, float] | None = None,
) -> MobilityData:
    """Load one set of MHSA pickles from ``directory`` with whatever maps and coordinates can be
    recovered (see the module docstring).

    Args:
        directory: folder holding ``*_{train,validation,test}.pk``.
        previous_day: choose the variant with this history length (needed when several exist).
        split: the split MHSA used, to refit its location encoder from ``dataSet_{dataset}.csv``
            (default :data:`MHSA_SPLIT`, what MHSA's dataloader hard-codes).

    Returns:
        :class:`~hsoftmax.data.samples.MobilityData` with ``info`` keys ``variant``,
        ``previous_day``, ``coordinates`` (where they came from, or why there are none),
        ``original_location_ids`` and ``original_user_ids`` (whether the maps hold original ids;
        when false they are the identity on the encoded ids).

    Raises:
        DataFormatError: no or ambiguous pickles, a bad pickle (naming file, sample and key), a
            companion file that does not match the pickles.
    """
    d = Path(directory)
    split = tuple(split) if split is not None else MHSA_SPLIT
    variant = select_mhsa_variant(find_mhsa_variants(d), previous_day, d)
    dirs = _search_dirs(d)
    prefix = variant.prefix
    n_meta = _read_meta(_find_file([d], [f"{prefix}meta.json"]))
    sets = {k: load_mhsa(variant.files[k], n_meta, as_sampleset=True) for k in SPLITS}
    for name, s in sets.items():
        if len(s) == 0:
            raise DataFormatError(f"{variant.files[name]}: holds no samples")
    max_diff = max(int(s.target_day.max() - s.day.min()) for s in sets.values())
    if previous_day is not None and variant.previous_day is None and max_diff > previous_day:
        raise DataFormatError(
            f"{d}: the samples of {variant.describe()} reach back {max_diff} days, more than "
            f"data.previous_day={previous_day}"
        )
    max_id = max(int(max(s.loc.max(), s.y.max())) for s in sets.values())
    n_users = 1 + max(int(s.user.max()) for s in sets.values())
    info: dict = {
        "source": str(d),
        "format": "mhsa",
        "variant": variant.name,
        "previous_day": variant.previous_day if variant.previous_day is not None else previous_day,
        "n_samples": {k: len(s) for k, s in sets.items()},
        "unseen_targets": {k: int((s.y == UNSEEN).sum()) for k, s in sets.items()},
    }

    vocab_csv = _find_file([d], [f"{prefix}vocab_locations.csv"])
    users_csv = _find_file([d], [f"{prefix}vocab_users.csv"])
    dataset = variant.dataset
    table = (
        _find_file(dirs, [f"dataSet_{dataset}.csv", f"dataset_{dataset}.csv"]) if dataset else None
    )
    loc_names = ["locations.csv"] + ([f"locations_{dataset}.csv"] if dataset else [])
    loc_file = _find_file(dirs, loc_names)

    locations = None
    if vocab_csv is not None:
        n_loc = n_meta if n_meta is not None else max_id + 1
        locations = _read_vocab_locations(vocab_csv, n_loc)
        location_ids = np.full(n_loc, -1, dtype=np.int64)
        if "id" in locations.columns:
            location_ids[locations["loc"].to_numpy()] = locations["id"].to_numpy(np.int64)
        info["coordinates"] = vocab_csv.name
        info["original_location_ids"] = "id" in locations.columns
    elif table is not None:
        vocab = _recover_vocab_from_table(table, sets, split)
        n_loc = len(vocab) + 2
        if n_meta is not None and n_meta != n_loc:
            raise DataFormatError(
                f"{table}: gives {n_loc} location ids, but the meta.json says {n_meta}"
            )
        location_ids = np.concatenate([[-1, -1], vocab]).astype(np.int64)
        info["original_location_ids"] = True
        info["coordinates"] = f"none: {table.name} recovers the ids, but no location table"
        logger.info(
            "%s: location ids mapped to original ids with %s (training split %s refitted)",
            d,
            table.name,
            split,
        )
    else:
        n_loc = n_meta if n_meta is not None else max_id + 1
        location_ids = np.concatenate([[-1, -1], np.arange(2, n_loc)]).astype(np.int64)
        info["original_location_ids"] = False
        info["coordinates"] = (
            f"none: no vocab_locations.csv and no dataSet_{dataset or '<dataset>'}.csv beside the "
            "pickles, so encoded ids cannot be matched to a location table"
        )

    if locations is None:
        lat = np.full(n_loc - 2, np.nan)
        lon = np.full(n_loc - 2, np.nan)
        if loc_file is not None:
            locs = read_locations(loc_file)
            ids = location_ids[2:]
            if not info["original_location_ids"] and len(locs) == n_loc - 2:
                # the assumption of the module docstring, point 3: the encoder saw exactly these
                logger.warning(
                    "%s: no staypoint table to recover MHSA's location encoding; assuming it was "
                    "fitted on exactly the %d ids of %s (encoded id k = the (k-2)-th smallest)",
                    d,
                    len(locs),
                    loc_file.name,
                )
                ids = locs["id"].to_numpy(np.int64)
                location_ids[2:] = ids
                info["original_location_ids"] = True
                info["coordinates"] = f"{loc_file.name}, matched by rank (assumed encoding)"
            elif info["original_location_ids"]:
                info["coordinates"] = f"{loc_file.name}, matched by original location id"
            else:
                info["coordinates"] += (
                    f" ({loc_file.name} has {len(locs)} locations, the vocabulary {n_loc - 2})"
                )
            if info["original_location_ids"]:
                li = locs.set_index("id")
                known = np.isin(ids, li.index.to_numpy())
                lat[known] = li.loc[ids[known], "lat"].to_numpy()
                lon[known] = li.loc[ids[known], "lon"].to_numpy()
                if not known.all():
                    logger.warning(
                        "%s: %d of %d vocabulary locations are not in %s (their coordinates "
                        "are set to the mean)",
                        d,
                        int((~known).sum()),
                        len(ids),
                        loc_file.name,
                    )
        locations = pd.DataFrame(
            {
                "loc": np.arange(2, n_loc, dtype=np.int64),
                "id": location_ids[2:],
                "lat": lat,
                "lon": lon,
            }
        )

    user_ids = np.arange(n_users, dtype=np.int64)
    user_ids[0] = -1
    info["original_user_ids"] = False
    if users_csv is not None:
        users = pd.read_csv(users_csv)
        if not {"user", "id"} <= set(users.columns):
            raise DataFormatError(f"{users_csv}: needs columns user, id; found {list(users)}")
        u = users["user"].to_numpy(np.int64)
        if len(u) and (u.min() < 1 or u.max() >= n_users):
            raise DataFormatError(f"{users_csv}: user {int(u.max())} is not in [1, {n_users})")
        user_ids[u] = users["id"].to_numpy(np.int64)
        info["original_user_ids"] = True
    if not info["original_user_ids"]:
        logger.info(
            "%s: user ids are MHSA's own numbering 1..%d (MHSA's outputs do not keep the "
            "original user ids)",
            d,
            n_users - 1,
        )
    data = MobilityData(
        sets["train"],
        sets["validation"],
        sets["test"],
        n_locations=int(n_loc),
        n_users=int(n_users),
        location_ids=location_ids,
        user_ids=user_ids,
        locations=locations,
        info=info,
        path=str(d.resolve()),
    )
    if not data.has_coordinates:
        logger.info("%s: no location coordinates: %s", d, info["coordinates"])
    return data
