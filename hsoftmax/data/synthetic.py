"""Synthetic human-mobility generator (staypoints + locations), vectorized with numpy.

The generator mimics the structure that makes next-location prediction hard and interesting,
not uniform noise.  Every parameter is a field of :class:`SynthConfig`; the field comments name the
source of the value (a paper, a property of the real DIY / Geolife sets, or "calibrated" when the
value was tuned so the derived data sets have the sizes and baseline accuracies documented in
``docs/data.md``).

Model, in the order it is simulated:

1. **Places.**  ``n_locations`` places in a square city-sized region around the preset's centre,
   drawn from a mixture of Gaussian neighbourhood clusters plus a uniform background (cities are
   polycentric, places cluster along neighbourhoods).  Each place gets a Zipf-distributed
   attractiveness ``w_j ~ rank^-zipf_exponent`` (Zipf-like place popularity, e.g. Noulas et al.
   2012, Song et al. 2010 Fig. 2).
2. **Users.**  A home (uniform over places, without replacement: homes are private places) and a
   main anchor ("work": office, campus, market) chosen by a gravity rule from home,
   ``P(j) ∝ w_j · (d + d0)^-work_beta``.  ``worker_fraction`` of the users go there on most
   weekdays, the rest on fewer days (students, informal work).  Each user has a contiguous tracked
   period (users join and leave an app-based study at different times) and, inside it, each day is
   observed with a per-user tracking quality ``q ~ Beta``.
3. **Weekly rhythm.**  A day is a *work day* (weekdays with probability ``p_workday``; weekends
   rarely) or an *off day*.  Work day: leave home in the morning, optional stop on the way, work,
   optional lunch stop and back, Poisson number of after-work stops, home.  Off day: Poisson number
   of stops from late morning, optionally a mid-day return home, home.  Departure times, lunch and
   end of work are user-specific means plus daily noise; stay durations are log-normal.
4. **Routines.**  Each user has a few weekly routines (a place tied to one weekday: sport club,
   Friday prayer, a weekly market).  On that weekday the first free stop goes there with
   probability ``p_routine``.  These are the time-dependent regularities a first-order Markov
   chain cannot see but a model with time features can.
5. **Exploration and preferential return** (EPR, Song, Koren, Wang & Barabási, "Modelling the
   scaling properties of human mobility", Nature Physics 6, 2010) for every other ("free") stop:
   with probability ``P_new = rho · S^-gamma`` (``S`` = distinct places visited so far) the user
   explores a new place chosen by a gravity rule around home and work; otherwise the user returns
   to a previously visited free-stop place with probability proportional to its visit count
   (Pólya urn: copy the place of a uniformly chosen earlier free stop).
6. **Observation.**  Each staypoint is lost with probability ``p_miss`` (GPS gaps, phone off), so
   observed sequences have holes like real ones.
7. **Provinces** (large vocabularies).  With ``n_cities > 1`` the region is a grid of cities, each
   simulated as above with its share of the users and places; nobody leaves their city, so the
   cost grows linearly with the number of cities rather than with users x places overall.

Everything is vectorized over users, days or slots; the only Python loops are over the EPR step
index (vectorized over all users at once) and over users for the gravity rankings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

__all__ = [
    "PRESETS",
    "SynthConfig",
    "SynthResult",
    "generate",
    "get_preset",
    "write_csv",
    "synthesize_to_dir",
]

logger = logging.getLogger("hsoftmax.data")

_KM_PER_DEG_LAT = 111.32
# slot types inside a day template
_HOME, _WORK, _FREE = 0, 1, 2


@dataclass(frozen=True)
class SynthConfig:
    """All knobs of the generator (see the module docstring for the model).

    Sizes and calendar
    """

    name: str = "custom"
    n_users: int = 803  # DIY: 803 users (issue 5)
    n_locations: int = 15_584  # DIY: 15,584 locations (issue 5); target training vocabulary
    # candidate places = pool_factor * n_locations; only visited ones are written (as a staypoint
    # clustering only creates visited locations).  Calibrated so that the encoded training
    # vocabulary of the built samples is close to n_locations.
    pool_factor: float = 4.3
    start_date: str = "2021-10-01"  # DIY: Oct 2021 - Jun 2022 (issue 5)
    n_days: int = 273  # 2021-10-01 .. 2022-06-30
    utc_offset: str = "+07:00"  # Yogyakarta is WIB, UTC+7; written into the timestamps
    # tracked period per user: length uniform in [min_span_days, n_days], start uniform
    min_span_days: int = 210  # calibrated (sample counts, users kept by the MHSA filter)
    # per-user probability that a day inside the tracked period is observed:
    # quality_min + (quality_max - quality_min) * Beta(quality_a, quality_b); calibrated so the
    # sample counts match the real set and nearly all users have samples in every split
    quality_a: float = 2.0
    quality_b: float = 2.0
    quality_min: float = 0.28
    quality_max: float = 0.45
    # Places: region and clustering
    center_lat: float = -7.7956  # Yogyakarta city centre
    center_lon: float = 110.3695
    region_km: float = 30.0  # side of the square region: the greater Yogyakarta area
    n_clusters: int = 60  # neighbourhoods; calibrated for a visibly clustered map
    cluster_sigma_km: tuple[float, float] = (0.3, 1.5)  # uniform range of cluster spreads
    background_fraction: float = 0.15  # places scattered uniformly outside clusters
    zipf_exponent: float = 0.7  # place attractiveness ~ rank^-s; Zipf-like (calibrated, s < 1)
    # Gravity rules: P(j) ∝ w_j (d + d0)^-beta
    work_beta: float = 1.0  # commuting distance decay; deliberately weak (long commutes exist)
    explore_beta: float = 1.5  # exploration decays faster: most new places are near home/work
    gravity_d0_km: float = 0.5  # avoids the singularity at d = 0
    # EPR (Song et al. 2010): P_new = rho * S^-gamma
    rho: float = 0.6  # Song et al. 2010: rho = 0.6 +- 0.25
    gamma: float = 0.21  # Song et al. 2010: gamma = 0.21 +- 0.04
    # recency (Barbosa et al. 2015, "The effect of recency to human mobility", EPJ Data Science
    # 4:21): a return goes with this probability to one of the last `recency_window` free-stop
    # places instead of in proportion to lifetime visit counts.  Gives the history window value.
    p_recency: float = 0.4
    recency_window: int = 10
    # Rhythm
    worker_fraction: float = 0.7  # share of users with a regular weekday anchor (calibrated)
    p_workday_worker: float = 0.85  # a weekday is a work day (holidays, sick days, WFH)
    p_workday_other: float = 0.4  # students / informal work: irregular anchor visits
    p_workday_weekend: float = 0.1  # weekend work (shops, markets, Saturday classes)
    p_prework_stop: float = 0.15  # coffee / drop-off on the way to work
    p_lunch_out: float = 0.3  # leaves work for lunch and comes back
    after_work_stops: float = 0.9  # Poisson mean of stops between work and home (max 3)
    offday_stops: float = 1.5  # Poisson mean of stops on an off day (max 4)
    p_offday_midhome: float = 0.3  # off day with a return home between stops
    # Routines: weekly place-and-weekday habits
    routines_per_user: tuple[int, int] = (1, 3)  # uniform integer range (inclusive)
    p_routine: float = 0.7  # routine followed on its weekday
    # habitual places tied to a time of day rather than a weekday
    p_usual_lunch: float = 0.5  # a lunch break goes to the user's usual canteen
    p_social: float = 0.45  # an off day starts at the user's social anchor (family, friends)
    # Timing (minutes since midnight; user mean + N(0, sd) daily noise)
    leave_home_work: tuple[float, float] = (6.5 * 60, 8.5 * 60)  # user mean uniform range
    leave_home_sd: float = 20.0
    leave_home_off: tuple[float, float] = (8.5 * 60, 11.0 * 60)
    leave_home_off_sd: float = 60.0
    lunch_start: float = 12 * 60
    lunch_sd: float = 15.0
    work_end: tuple[float, float] = (15.5 * 60, 18.0 * 60)
    work_end_sd: float = 30.0
    stay_median_min: float = 70.0  # free stops: log-normal stay duration
    stay_sigma: float = 0.7
    travel_min: tuple[float, float] = (8.0, 35.0)  # uniform travel time between stays
    # Observation
    p_miss: float = 0.08  # staypoint not recorded (GPS gaps); calibrated
    # Large vocabularies: the region is a province of n_cities cities on a square grid,
    # city_spacing_km apart (centre to centre).  Each city is the model above with
    # n_users / n_cities users and n_locations / n_cities places; people live, work and explore
    # in their own city, so the cost of generation grows linearly with the number of cities
    # (the gravity rules are O(users x places) within a city).
    n_cities: int = 1
    city_spacing_km: float = 60.0
    # Sample-building defaults that go with the preset (the protocol used for the real set)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    previous_day: int = 7
    notes: str = field(default="", compare=False)

    def replace(self, **changes) -> SynthConfig:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _load_presets() -> dict[str, SynthConfig]:
    # The presets are data: presets.yaml lists each one's changes to SynthConfig's defaults.
    import yaml

    text = (Path(__file__).with_name("presets.yaml")).read_text(encoding="utf-8")
    tuples = {f.name for f in dataclasses.fields(SynthConfig) if str(f.type).startswith("tuple")}
    presets = {}
    for name, changes in yaml.safe_load(text).items():
        changes = {k: tuple(v) if k in tuples else v for k, v in (changes or {}).items()}
        presets[name] = SynthConfig(name=name, **changes)
    return presets


PRESETS: dict[str, SynthConfig] = _load_presets()


def get_preset(name: str) -> SynthConfig:
    """Return the :class:`SynthConfig` of a named preset (``diy``, ``geolife``, ``small``,
    ``diy-100k``, ``diy-1m``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


@dataclass
class SynthResult:
    """Output of :func:`generate`.

    ``staypoints``: columns ``id, user_id, location_id, started_at, finished_at`` (timestamps as
    ISO-8601 strings with the preset's UTC offset, sorted by user then time).
    ``locations``: columns ``id, lat, lon``.
    ``seconds``: wall time of the generation.
    """

    staypoints: pd.DataFrame
    locations: pd.DataFrame
    config: SynthConfig
    seed: int
    seconds: float


# --------------------------------------------------------------------------------------------
# places and users


def _pool_size(cfg: SynthConfig) -> int:
    return max(int(round(cfg.n_locations * cfg.pool_factor)), 8)


def _make_places(cfg: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (xy in km, shape (L, 2); attractiveness, shape (L,), summing to 1)."""
    L = _pool_size(cfg)
    half = cfg.region_km / 2
    centres = rng.uniform(-half * 0.8, half * 0.8, size=(cfg.n_clusters, 2))
    sigmas = rng.uniform(*cfg.cluster_sigma_km, size=cfg.n_clusters)
    # uneven neighbourhood sizes: a few dense centres, many small ones
    weights = rng.dirichlet(np.full(cfg.n_clusters, 0.7))
    in_cluster = rng.random(L) >= cfg.background_fraction
    cl = rng.choice(cfg.n_clusters, size=L, p=weights)
    xy = np.where(
        in_cluster[:, None],
        centres[cl] + rng.standard_normal((L, 2)) * sigmas[cl, None],
        rng.uniform(-half, half, size=(L, 2)),
    )
    xy = np.clip(xy, -half, half)
    ranks = rng.permutation(L) + 1.0
    attract = ranks ** (-cfg.zipf_exponent)
    return xy, attract / attract.sum()


def _gumbel_topk(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted sampling of k items without replacement (Gumbel-top-k), in sampling order."""
    keys = logits + rng.gumbel(size=logits.shape)
    k = min(k, int(np.isfinite(logits).sum()))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    top = np.argpartition(-keys, k - 1)[:k]
    return top[np.argsort(-keys[top], kind="stable")]


# --------------------------------------------------------------------------------------------
# days and slots


def _tracked_days(cfg: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (user, day) of every observed day, sorted by user then day."""
    U, T = cfg.n_users, cfg.n_days
    span = rng.integers(min(cfg.min_span_days, T), T + 1, size=U)
    first = (rng.random(U) * (T - span + 1)).astype(np.int64)
    quality = cfg.quality_min + (cfg.quality_max - cfg.quality_min) * rng.beta(
        cfg.quality_a, cfg.quality_b, size=U
    )
    day = np.arange(T)
    observed = (
        (day[None, :] >= first[:, None])
        & (day[None, :] < (first + span)[:, None])
        & (rng.random((U, T)) < quality[:, None])
    )
    # the first and last day of the period are observed by definition of the tracked period
    observed[np.arange(U), first] = True
    observed[np.arange(U), first + span - 1] = True
    users, days = np.nonzero(observed)
    return users.astype(np.int64), days.astype(np.int64)


def _build_slots(cfg: SynthConfig, rng: np.random.Generator, users, days, weekday0: int):
    """Lay out every observed day as a sequence of stays (vectorized day templates).

    Returns a dict of flat per-stay arrays (user, day, kind, start minute since the epoch of the
    simulation, duration or -1 for home, routine flag) in chronological order per user.
    """
    U = cfg.n_users
    D = len(users)
    wd = (weekday0 + days) % 7
    weekend = wd >= 5
    worker = rng.random(U) < cfg.worker_fraction
    p_work = np.where(worker, cfg.p_workday_worker, cfg.p_workday_other)
    workday = rng.random(D) < np.where(weekend, cfg.p_workday_weekend, p_work[users])

    # routines: routine_loc_slot[u, weekday] = index of the user's routine place or -1
    n_rout = rng.integers(cfg.routines_per_user[0], cfg.routines_per_user[1] + 1, size=U)
    order = np.argsort(rng.random((U, 7)), axis=1)  # distinct weekdays per user
    routine_of_wd = np.full((U, 7), -1, dtype=np.int64)
    for r in range(cfg.routines_per_user[1]):
        has = n_rout > r
        routine_of_wd[np.nonzero(has)[0], order[has, r]] = r
    routine_today = routine_of_wd[users, wd]
    does_routine = (routine_today >= 0) & (rng.random(D) < cfg.p_routine)

    # 8-column templates; a column is present or not
    # work day: [pre, WORK, lunch, WORK, after1, after2, after3, HOME]
    # off day:  [s1, s2, HOME(mid), s3, s4, -, -, HOME]
    k_after = np.minimum(rng.poisson(cfg.after_work_stops, D), 3)
    k_off = np.minimum(rng.poisson(cfg.offday_stops, D), 4)
    k_after = np.where(does_routine, np.maximum(k_after, 1), k_after)
    k_off = np.where(does_routine, np.maximum(k_off, 1), k_off)
    pre = rng.random(D) < cfg.p_prework_stop
    lunch = rng.random(D) < cfg.p_lunch_out
    midhome = (rng.random(D) < cfg.p_offday_midhome) & (k_off >= 3)
    one = np.ones(D, dtype=bool)
    work_present = np.stack(
        [pre, one, lunch, lunch, k_after >= 1, k_after >= 2, k_after >= 3, one], axis=1
    )
    off_present = np.stack(
        [k_off >= 1, k_off >= 2, midhome, k_off >= 3, k_off >= 4, ~one, ~one, k_off >= 1],
        axis=1,
    )
    present = np.where(workday[:, None], work_present, off_present)
    work_kind = np.array([_FREE, _WORK, _FREE, _WORK, _FREE, _FREE, _FREE, _HOME])
    off_kind = np.array([_FREE, _FREE, _HOME, _FREE, _FREE, _FREE, _FREE, _HOME])
    kind = np.where(workday[:, None], work_kind[None, :], off_kind[None, :])
    # habitual places, as a code per column (-1: none; r < n_routines: routine r; then the usual
    # lunch place and the social anchor).  The routine replaces the first free stop after work /
    # of the off day; the social anchor the first stop of an off day without routine.
    n_rmax = cfg.routines_per_user[1]
    fixed = np.full((D, 8), -1, dtype=np.int64)
    rows_d = np.arange(D)
    social = ~workday & ~does_routine & (rng.random(D) < cfg.p_social)
    fixed[rows_d[social], 0] = n_rmax + 1
    usual_lunch = workday & lunch & (rng.random(D) < cfg.p_usual_lunch)
    fixed[rows_d[usual_lunch], 2] = n_rmax
    routine_col = np.where(workday, 4, 0)
    fixed[rows_d[does_routine], routine_col[does_routine]] = routine_today[does_routine]

    # durations (minutes) of each column; travel gaps before each column
    leave_w = rng.uniform(*cfg.leave_home_work, size=U)[users]
    leave_o = rng.uniform(*cfg.leave_home_off, size=U)[users]
    end_w = rng.uniform(*cfg.work_end, size=U)[users]
    t_leave = np.where(
        workday,
        leave_w + rng.normal(0, cfg.leave_home_sd, D),
        leave_o + rng.normal(0, cfg.leave_home_off_sd, D),
    )
    t_lunch = cfg.lunch_start + rng.normal(0, cfg.lunch_sd, D)
    t_end = end_w + rng.normal(0, cfg.work_end_sd, D)
    travel = rng.uniform(*cfg.travel_min, size=(D, 8))
    stay = np.exp(np.log(cfg.stay_median_min) + cfg.stay_sigma * rng.standard_normal((D, 8)))
    stay = np.clip(stay, 10.0, 8 * 60.0)
    short = rng.uniform(15, 40, size=D)  # pre-work stop
    lunch_d = rng.uniform(30, 70, size=D)
    midhome_d = rng.uniform(60, 180, size=D)

    # chronological start of each column (cumulative within the day); work columns are pinned
    # to lunch / end-of-work clock times so that times of day stay realistic
    start = np.zeros((D, 8))
    dur = stay.copy()
    t = t_leave.copy()
    for c in range(8):
        p = present[:, c]
        t = np.where(p, t + travel[:, c], t)
        start[:, c] = t
        if c == 0:
            d = np.where(workday, short, stay[:, 0])
        elif c == 1:
            d = np.where(workday, np.where(lunch, t_lunch, t_end) - t, stay[:, 1])
        elif c == 2:
            d = np.where(workday, lunch_d, midhome_d)
        elif c == 3:
            d = np.where(workday, t_end - t, stay[:, 3])
        else:
            d = stay[:, c]
        d = np.maximum(d, 10.0)
        dur[:, c] = d
        t = np.where(p, t + d, t)
    dur[:, 7] = -1.0  # the evening home stay ends when the next day starts

    rows, cols = np.nonzero(present)  # row-major: chronological within user (days are sorted)
    return {
        "user": users[rows],
        "day": days[rows],
        "kind": kind[rows, cols],
        "fixed": fixed[rows, cols],
        "start": days[rows] * 1440.0 + start[rows, cols],
        "dur": dur[rows, cols],
        "worker": worker,
        "n_routines": n_rout,
    }


# --------------------------------------------------------------------------------------------
# exploration and preferential return


def _epr(cfg, rng, slot_user, free_mask, prev_loc, prev_is_free, explore_order, n_explorable,
         s0, progress):  # fmt: skip
    """Assign places to the free stops by EPR, one step index at a time for all users at once.

    ``explore_order[u]``: the user's places in gravity-sampled exploration order.
    ``prev_loc``: place of the previous stay when it is an anchor, or -1.
    Returns the place of every free stop (aligned with ``np.nonzero(free_mask)``).
    """
    U = cfg.n_users
    fu = slot_user[free_mask]
    counts = np.bincount(fu, minlength=U)
    n_max = int(counts.max()) if len(fu) else 0
    # position of each free stop within its user's free sequence
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(fu)) - starts[fu]
    F = np.full((U, max(n_max, 1)), -1, dtype=np.int64)
    prev_anchor = np.full_like(F, -1)
    prev_free = np.zeros(F.shape, dtype=bool)
    prev_anchor[fu, pos] = prev_loc[free_mask]
    prev_free[fu, pos] = prev_is_free[free_mask]

    S = s0.astype(np.float64).copy()
    n_expl = np.zeros(U, dtype=np.int64)
    rows = np.arange(U)
    for n in tqdm(range(n_max), desc="EPR steps", disable=not progress, leave=False, delay=1.0):
        active = n < counts
        if not active.any():
            break
        prev = np.where(prev_free[:, n], F[:, n - 1] if n > 0 else -1, prev_anchor[:, n])
        p_new = cfg.rho * S ** (-cfg.gamma)
        explore = (rng.random(U) < p_new) | (n == 0)
        # preferential return: copy a uniformly chosen earlier free stop (Pólya urn), never the
        # place the user is at; a couple of redraws, then explore instead
        ret = np.full(U, -1, dtype=np.int64)
        if n > 0:
            todo = ~explore
            recent = rng.random(U) < cfg.p_recency
            lo = np.where(recent, max(n - cfg.recency_window, 0), 0)
            for _ in range(3):
                k = lo + (rng.random(U) * (n - lo)).astype(np.int64)
                cand = F[rows, k]
                ok = todo & (cand != prev)
                ret = np.where(ok, cand, ret)
                todo &= ~ok
            explore |= todo
        explore &= n_expl < n_explorable
        new_loc = explore_order[rows, np.minimum(n_expl, explore_order.shape[1] - 1)]
        loc = np.where(explore, new_loc, ret)
        # a user who can neither explore nor return (tiny presets) revisits an earlier stop
        stuck = active & (loc < 0)
        if stuck.any():
            loc = np.where(stuck, F[rows, 0] if n > 0 else explore_order[:, 0], loc)
        F[:, n] = np.where(active, loc, -1)
        n_expl += explore & active
        S += explore & active
    return F[fu, pos]


# --------------------------------------------------------------------------------------------


def _simulate_city(cfg: SynthConfig, rng: np.random.Generator, progress: bool):
    """Simulate one city; return the observed stays and the visited places.

    Returns ``(user (S,), place (S,) in 0..P-1, start (S,), end (S,), xy (P, 2))``: user index,
    visited-place index, start and end in minutes since ``cfg.start_date``, and the visited
    places' coordinates in km from the city centre (places in pool order, which is random).
    """
    U, L = cfg.n_users, _pool_size(cfg)
    bar = tqdm(total=5, desc=f"synth {cfg.name}", disable=not progress, leave=False, delay=1.0)

    xy, attract = _make_places(cfg, rng)
    log_attr = np.log(attract)
    bar.update()

    users, days = _tracked_days(cfg, rng)
    weekday0 = pd.Timestamp(cfg.start_date).weekday()
    sl = _build_slots(cfg, rng, users, days, weekday0)
    bar.update()

    # anchors: homes distinct where possible, work by gravity from home
    home = rng.choice(L, size=U, replace=U > L)
    work = np.empty(U, dtype=np.int64)
    n_free = np.bincount(sl["user"][sl["kind"] == _FREE], minlength=U)
    n_rmax = cfg.routines_per_user[1]
    # habitual places: routines 0..n_rmax-1, usual lunch place, social anchor
    fixed_loc = np.full((U, n_rmax + 2), -1, dtype=np.int64)
    k_order = int(min(L, n_free.max() + 1 if len(n_free) else 1))
    explore_order = np.zeros((U, max(k_order, 1)), dtype=np.int64)
    n_explorable = np.zeros(U, dtype=np.int64)
    for u in tqdm(range(U), desc="gravity", disable=not progress, leave=False, delay=1.0):
        d_home = np.hypot(*(xy - xy[home[u]]).T)
        lw = log_attr - cfg.work_beta * np.log(d_home + cfg.gravity_d0_km)
        lw[home[u]] = -np.inf
        work[u] = _gumbel_topk(lw, 1, rng)[0]
        d_work = np.hypot(*(xy - xy[work[u]]).T)
        # exploration happens around both anchors (Song et al. 2010; Pappalardo et al. 2015)
        near = (d_home + cfg.gravity_d0_km) ** (-cfg.explore_beta) + (
            d_work + cfg.gravity_d0_km
        ) ** (-cfg.explore_beta)
        le = log_attr + np.log(near)
        le[home[u]] = le[work[u]] = -np.inf
        order = _gumbel_topk(le, n_rmax + 2 + k_order, rng)
        nr = int(sl["n_routines"][u])
        fixed_loc[u, :nr] = order[:nr]
        fixed_loc[u, n_rmax : n_rmax + 2] = order[nr : nr + 2]
        rest = order[nr + 2 : nr + 2 + k_order]
        explore_order[u, : len(rest)] = rest
        n_explorable[u] = len(rest)
    bar.update()

    # places of anchor stays; free stops get theirs from EPR
    su, kind = sl["user"], sl["kind"]
    loc = np.full(len(su), -1, dtype=np.int64)
    loc[kind == _HOME] = home[su[kind == _HOME]]
    loc[kind == _WORK] = work[su[kind == _WORK]]
    fmask = sl["fixed"] >= 0
    loc[fmask] = fixed_loc[su[fmask], sl["fixed"][fmask]]
    free = (kind == _FREE) & ~fmask
    prev_same_user = np.concatenate([[False], su[1:] == su[:-1]])
    prev_loc = np.where(prev_same_user, np.concatenate([[-1], loc[:-1]]), home[su])
    prev_is_free = np.concatenate([[False], free[:-1]]) & prev_same_user
    s0 = 1 + (work != home) + sl["n_routines"] + 2
    loc[free] = _epr(
        cfg, rng, su, free, prev_loc, prev_is_free, explore_order, n_explorable, s0, progress
    )
    bar.update()

    # timing: the home stay ends when the next stay starts (minus travel), but a night at home
    # before an unobserved day ends the next morning (the device stopped recording)
    start = sl["start"]
    dur = sl["dur"]
    next_start = np.concatenate([start[1:], [np.inf]])
    next_same = np.concatenate([su[1:] == su[:-1], [False]])
    travel = rng.uniform(*cfg.travel_min, size=len(su))
    morning = (sl["day"] + 1) * 1440.0 + rng.uniform(*cfg.leave_home_work, size=len(su))
    home_end = np.where(
        next_same & (next_start - start < 34 * 60),
        next_start - travel,
        np.minimum(morning, start + 16 * 60),
    )
    end = np.where(dur < 0, home_end, start + dur)
    end = np.where(next_same, np.minimum(end, next_start - 1), end)
    start_m = np.floor(start).astype(np.int64)
    end_m = np.maximum(np.floor(end).astype(np.int64), start_m + 5)

    keep = rng.random(len(su)) >= cfg.p_miss
    # only observed places become locations (ids 0..n-1 in pool order, which is random)
    visited, loc_id = np.unique(loc[keep], return_inverse=True)
    bar.update()
    bar.close()
    return su[keep], loc_id.astype(np.int64), start_m[keep], end_m[keep], xy[visited]


def _city_centres_km(cfg: SynthConfig) -> np.ndarray:
    """(n_cities, 2) city centres in km on a square grid centred on the preset's centre."""
    side = math.ceil(math.sqrt(cfg.n_cities))
    i = np.arange(cfg.n_cities)
    grid = np.stack([i % side, i // side], axis=1).astype(np.float64)
    return (grid - (side - 1) / 2) * cfg.city_spacing_km


def _even_split(total: int, parts: int) -> np.ndarray:
    return total // parts + (np.arange(parts) < total % parts)


def _simulate(cfg: SynthConfig, seed: int, progress: bool):
    """The province's stays and visited places as arrays (see :func:`_simulate_city`; users and
    places numbered across cities, coordinates in km from the preset's centre)."""
    if cfg.n_cities < 1 or cfg.n_cities > min(cfg.n_users, cfg.n_locations):
        raise ValueError(
            f"n_cities must be in [1, min(n_users, n_locations)] = "
            f"[1, {min(cfg.n_users, cfg.n_locations)}], got {cfg.n_cities}"
        )
    if cfg.n_cities == 1:
        return _simulate_city(cfg, np.random.default_rng(seed), progress)
    users = _even_split(cfg.n_users, cfg.n_cities)
    places = _even_split(cfg.n_locations, cfg.n_cities)
    centres = _city_centres_km(cfg)
    children = np.random.SeedSequence(seed).spawn(cfg.n_cities)
    parts = []
    n_users = n_places = 0
    for c in tqdm(range(cfg.n_cities), desc=f"synth {cfg.name}", disable=not progress,
                  delay=1.0):  # fmt: skip
        city = cfg.replace(n_users=int(users[c]), n_locations=int(places[c]), n_cities=1)
        u, p, s, e, q = _simulate_city(city, np.random.default_rng(children[c]), False)
        parts.append((u + n_users, p + n_places, s, e, q + centres[c]))
        n_users += int(users[c])
        n_places += len(q)
    return tuple(np.concatenate(a) for a in zip(*parts, strict=True))


def generate(
    config: SynthConfig | str = "diy", seed: int = 0, progress: bool = True
) -> SynthResult:
    """Generate synthetic staypoints and locations.

    Args:
        config: a preset name (``diy``, ``geolife``, ``small``, ``diy-100k``, ``diy-1m``) or a
            :class:`SynthConfig`.
        seed: seed of the numpy ``Generator``; the same seed gives identical output.  With
            ``n_cities > 1`` each city draws from its own child of ``SeedSequence(seed)``.
        progress: show tqdm progress bars.

    Returns:
        :class:`SynthResult` with the ``staypoints`` and ``locations`` DataFrames.
    """
    cfg = get_preset(config) if isinstance(config, str) else config
    t0 = time.perf_counter()
    su, loc_id, start_m, end_m, xy = _simulate(cfg, seed, progress)
    base = np.datetime64(pd.Timestamp(cfg.start_date).date(), "m")
    started = np.datetime_as_string(base + start_m.astype("timedelta64[m]"), unit="s")
    finished = np.datetime_as_string(base + end_m.astype("timedelta64[m]"), unit="s")
    n = len(su)
    staypoints = pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "user_id": su,
            "location_id": loc_id,
            "started_at": np.char.add(started, cfg.utc_offset),
            "finished_at": np.char.add(finished, cfg.utc_offset),
        }
    )
    lat = cfg.center_lat + xy[:, 1] / _KM_PER_DEG_LAT
    lon = cfg.center_lon + xy[:, 0] / (_KM_PER_DEG_LAT * math.cos(math.radians(cfg.center_lat)))
    locations = pd.DataFrame(
        {
            "id": np.arange(len(xy), dtype=np.int64),
            "lat": np.round(lat, 6),
            "lon": np.round(lon, 6),
        }
    )
    return SynthResult(staypoints, locations, cfg, seed, time.perf_counter() - t0)


def write_csv(result: SynthResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``staypoints.csv`` and ``locations.csv`` into ``out_dir`` (created if needed).

    The files are byte-identical for the same preset and seed.  Returns both paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp_path, loc_path = out / "staypoints.csv", out / "locations.csv"
    result.staypoints.to_csv(sp_path, index=False, lineterminator="\n")
    result.locations.to_csv(loc_path, index=False, float_format="%.6f", lineterminator="\n")
    return sp_path, loc_path


def synthesize_to_dir(
    preset: str | SynthConfig, seed: int, out_dir: str | os.PathLike, progress: bool = True
) -> SynthResult:
    """Generate a preset and write its CSVs into ``out_dir``; returns the :class:`SynthResult`."""
    result = generate(preset, seed=seed, progress=progress)
    write_csv(result, out_dir)
    logger.info(
        "generated %s (seed %d): %d staypoints, %d users, %d locations in %.1f s",
        result.config.name,
        seed,
        len(result.staypoints),
        result.config.n_users,
        len(result.locations),
        result.seconds,
    )
    return result
