"""Interval-censored regression of T_forget on state size: the exponent b of T_forget ~ a * N_S^b.

What this is
    Support code (no experiment of its own) for measuring how the length a Mamba-2 model can be
    trained at before it starts to forget grows with its state size. T_forget is measured on a grid
    of training lengths T_1 < T_2 < ... (powers of two in our sweeps), so a measurement is never a
    number but an interval: forgetting first seen at T_i says T_forget lies in (T_{i-1}, T_i]. A
    least-squares fit of the grid values treats ten points stuck at one grid value as ten exact
    agreements; this module fits the intervals themselves by maximum likelihood instead.

Papers
    Stuffed Mamba (arXiv 2410.07145), its fit of T_forget against state size across Mamba-2 sizes:
    T_forget ~= 5.172 * N_S - 4.469 (T in K tokens, N_S in M elements); its
    proportional part is `paper_prediction` below, the reference line for our exponent.
    Censored (Tobit-style) Gaussian regression: Tobin (1958); interval censoring: the same likelihood
    with both ends of every observation's interval.

Reading order
    1. `grid_interval`       one measurement on the grid -> an interval for T_forget (tokens);
       `verdict_interval`    the same from one model's verdicts at every grid point
    2. `interval_log_prob`   log P(lo < y <= hi) for y ~ Normal(mu, sigma): the likelihood of one point
    3. `nelder_mead`         a small derivative-free minimiser (numpy only)
    4. `fit_power_law`       maximum likelihood, then the profile-likelihood 95% interval for b
       (`fit_intervals`: the same from intervals)
    5. `paper_prediction`    Stuffed Mamba's line, for reference

Glossary
    N_S   state size: elements of the recurrent state (all layers' SSM + conv state), the paper's "S"
    T     a training length on the grid (tokens); T_min / T_max its first / last point
    x     log2 N_S;  y = log2 T_forget (the latent, never observed exactly)
    b     slope (exponent):   y = c + b x + sigma * eps,  eps ~ Normal(0, 1)
    c     intercept in log2 tokens; the prefactor is a = 2^c
    sigma residual standard deviation of y (log2 units: sigma = 1 is a factor of 2)
    left-censored   seen at T_min:     y <= log2 T_min
    right-censored  never seen:        y >  log2 T_max
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Constants (units and sources)
# ----------------------------------------------------------------------------------------------

PAPER_SLOPE_K_PER_M = 5.172  # Stuffed Mamba's fit: K tokens of T_forget per M state elements
PAPER_INTERCEPT_K = -4.469  # Stuffed Mamba's fit: intercept in K tokens
CHI2_1_95 = 3.841458820694124  # 95% quantile of chi-square with 1 dof: the profile-likelihood cut
SIGMA_FLOOR = 0.02  # log2 units: smallest residual sd. A line that threads every interval has
#                     likelihood 1 as sigma -> 0; the floor keeps the maximum defined (the interval for
#                     b is then, in effect, the set of slopes whose lines thread the intervals)
SLOPE_SEARCH_SPAN = 16.0  # the interval search looks this far from b_hat (log-log slope units); a bound
#                           not found within it is reported as infinite (the data cannot bound it)
NM_TOL = 1e-7  # Nelder-Mead stops when the simplex's values differ by less than this (nats)
NM_XTOL = 1e-5  # ... and its vertices lie within this of each other (parameter units)
NM_MAX_ITER = 4000  # Nelder-Mead iteration cap
BISECT_STEPS = 40  # most bisection steps for each interval bound
BISECT_XTOL = 1e-3  # an interval bound is located to this (slope units): far below any reported digit


# ----------------------------------------------------------------------------------------------
# 1. measurements on a grid -> intervals
# ----------------------------------------------------------------------------------------------

def _check_grid(grid: Sequence[float]) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size < 2 or not np.all(np.isfinite(g)) or np.any(g <= 0) or np.any(np.diff(g) <= 0):
        raise ValueError(f"grid must be >= 2 finite positive training lengths in increasing order, got {list(grid)}")
    return g


def grid_interval(first_seen: float | None, grid: Sequence[float]) -> tuple[float, float]:
    """The interval (lo, hi] in tokens that a grid measurement puts T_forget in.

    Args:
        first_seen: the grid point T_i at which forgetting was first seen, or None (never seen).
        grid: the training lengths T_1 < ... < T_max that were run.
    Returns:
        (lo, hi): (T_{i-1}, T_i]; (0, T_min] when seen at the first point (left-censored);
        (T_max, inf) when never seen (right-censored).
    """
    g = _check_grid(grid)
    if first_seen is None or (isinstance(first_seen, float) and math.isinf(first_seen)):
        return float(g[-1]), math.inf
    hits = np.flatnonzero(g == float(first_seen))
    if hits.size != 1:
        raise ValueError(f"first_seen={first_seen} is not a point of the grid {g.tolist()} "
                         "(pass the grid length at which forgetting was first seen, or None)")
    i = int(hits[0])
    return (0.0 if i == 0 else float(g[i - 1])), float(g[i])


COLLAPSED, FORGETS = "collapsed", "not collapsed"  # the two verdicts that say something about T_forget


def verdict_interval(verdicts: dict[float, str]) -> tuple[float, float, int]:
    """The interval (lo, hi] that a model's verdicts over a T_train grid put T_forget in.

    T_forget is the shortest training length at which the model learns to forget (it no longer
    collapses beyond T_train). Each grid point's verdict is COLLAPSED (T_train < T_forget),
    FORGETS (T_train >= T_forget) or anything else (gate-failed, failed: the point says nothing):
        lo = the largest T with COLLAPSED (0 if none: left-censored)
        hi = the smallest T above lo with FORGETS (inf if none: right-censored)
    Points that say nothing between lo and hi only widen the interval, as they should.

    Args:
        verdicts: {T_train (tokens): verdict} for one (state size, seed).
    Returns:
        (lo, hi, out_of_order): out_of_order counts FORGETS verdicts below lo, which a monotone
        T_forget cannot produce (reported beside the interval, never dropped).
    """
    if not verdicts:
        raise ValueError("verdicts is empty: give {T_train: verdict} for at least one grid point")
    if any(not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0) for t in verdicts):
        raise ValueError(f"training lengths must be positive numbers, got {sorted(verdicts)}")
    collapsed = [t for t, v in verdicts.items() if v == COLLAPSED]
    lo = float(max(collapsed)) if collapsed else 0.0
    above = [t for t, v in verdicts.items() if v == FORGETS and t > lo]
    hi = float(min(above)) if above else math.inf
    out_of_order = sum(1 for t, v in verdicts.items() if v == FORGETS and t < lo)
    return lo, hi, out_of_order


# ----------------------------------------------------------------------------------------------
# 2. the likelihood of one interval
# ----------------------------------------------------------------------------------------------

_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def _log_upper_tail(z: np.ndarray) -> np.ndarray:
    """log Q(z) = log P(eps > z) for z > 0, accurate where Q underflows (asymptotic series)."""
    q = 0.5 * _erfc(z / math.sqrt(2.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        exact = np.log(q)
        # Q(z) ~ phi(z) / z * (1 - 1/z^2) for large z (Abramowitz & Stegun 26.2.12)
        asym = -0.5 * z * z - np.log(z * math.sqrt(2 * math.pi)) + np.log1p(-1.0 / (z * z))
    return np.where(q > 1e-300, exact, asym)


def interval_log_prob(lo: np.ndarray, hi: np.ndarray, mu: np.ndarray, sigma: float) -> np.ndarray:
    """log P(lo < y <= hi) for y ~ Normal(mu, sigma^2), elementwise; lo may be -inf, hi +inf.

    P = Phi((hi - mu) / sigma) - Phi((lo - mu) / sigma). The difference is taken on the side of the
    distribution where both terms are small (upper tails when the interval lies above mu, lower
    tails when below), so no digits cancel; where it still underflows, the asymptotic log tail of
    the nearer end stands in (the far end's share is then negligible).
    """
    zl = (lo - mu) / sigma
    zh = (hi - mu) / sigma
    above = zl > 0  # interval above the mean: use upper tails Q(zl) - Q(zh)
    a = np.where(above, zl, -zh)  # nearer end, mirrored to the upper tail (>= 0 where it matters)
    f = np.where(above, zh, -zl)  # farther end, mirrored
    r2 = 1.0 / math.sqrt(2.0)
    p = 0.5 * (_erfc(a * r2) - _erfc(f * r2))  # P = Q(a) - Q(f), a <= f
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.clip(p, 0.0, None))
        far = np.maximum(a, 1.0)  # the asymptote is only used where p underflows, i.e. a >> 1
        out = np.where(p > 1e-300, out, _log_upper_tail(far))
    return out


# ----------------------------------------------------------------------------------------------
# 3. a small Nelder-Mead minimiser
# ----------------------------------------------------------------------------------------------

def nelder_mead(f: Callable[[np.ndarray], float], x0: Sequence[float], step: Sequence[float],
                tol: float = NM_TOL, max_iter: int = NM_MAX_ITER) -> tuple[np.ndarray, float]:
    """Minimise f from x0 with the Nelder-Mead simplex (standard coefficients 1, 2, 1/2, 1/2).

    Args:
        f: objective of a (d,) array.
        x0: start (d,); step: initial simplex edge per coordinate (d,).
    Returns:
        (x_min (d,), f(x_min))
    """
    x0 = np.asarray(x0, dtype=np.float64)
    d = x0.size
    simplex = np.vstack([x0] + [x0 + np.eye(d)[i] * step[i] for i in range(d)])  # (d+1, d)
    values = np.array([f(v) for v in simplex])
    for _ in range(max_iter):
        order = np.argsort(values)
        simplex, values = simplex[order], values[order]
        if values[-1] - values[0] < tol and np.max(np.abs(simplex - simplex[0])) < NM_XTOL:
            break
        centroid = simplex[:-1].mean(axis=0)
        worst = simplex[-1]
        xr = centroid + (centroid - worst)  # reflect
        fr = f(xr)
        if fr < values[0]:
            xe = centroid + 2.0 * (centroid - worst)  # expand
            fe = f(xe)
            simplex[-1], values[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (worst - centroid) if fr >= values[-1] else centroid + 0.5 * (xr - centroid)
            fc = f(xc)
            if fc < min(fr, values[-1]):
                simplex[-1], values[-1] = xc, fc
            else:  # shrink towards the best vertex
                simplex[1:] = simplex[0] + 0.5 * (simplex[1:] - simplex[0])
                values[1:] = [f(v) for v in simplex[1:]]
    best = int(np.argmin(values))
    return simplex[best], float(values[best])


# ----------------------------------------------------------------------------------------------
# 4. the fit
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CensoredFit:
    """Result of `fit_power_law`: log2 T_forget = intercept + slope * log2 N_S + sigma * eps."""

    slope: float  # b, the exponent of T_forget ~ a * N_S^b (maximum likelihood; arbitrary when slope_ci is infinite)
    intercept: float  # c, log2 tokens at N_S = 1; prefactor a = 2^c
    sigma: float  # residual sd of log2 T_forget (log2 units); SIGMA_FLOOR means "lines thread all intervals"
    slope_ci: tuple[float, float]  # profile-likelihood 95% interval for b; +-inf where the data cannot bound it
    log_likelihood: float  # at the maximum (nats)
    n_points: int  # (state, seed) measurements
    n_left_censored: int  # seen at the first grid point: T_forget <= T_min
    n_right_censored: int  # never seen: T_forget > T_max
    intervals: tuple[tuple[float, float], ...]  # per point (lo, hi] in tokens, input order (lo 0, hi inf when censored)

    @property
    def n_censored(self) -> int:
        """Points censored on either side."""
        return self.n_left_censored + self.n_right_censored

    @property
    def prefactor(self) -> float:
        """a in T_forget ~ a * N_S^b (tokens)."""
        return 2.0 ** self.intercept

    @property
    def slope_bounded(self) -> bool:
        """True when both ends of the slope interval are finite."""
        return all(math.isfinite(v) for v in self.slope_ci)


def fit_power_law(n_state: Sequence[float], first_seen: Sequence[float | None],
                  grid: Sequence[float]) -> CensoredFit:
    """Maximum-likelihood fit of T_forget ~ a * N_S^b to grid measurements, with a 95% interval for b.

    Each measurement becomes its interval (`grid_interval`), then `fit_intervals` fits them.

    Args:
        n_state: N_S per measurement (state elements), (n,).
        first_seen: per measurement, the grid length at which forgetting was first seen, or None.
        grid: the training lengths run, increasing (tokens).
    Returns:
        CensoredFit
    """
    if len(n_state) != len(first_seen):
        raise ValueError(f"n_state and first_seen must be of equal length, got {len(n_state)} and {len(first_seen)}")
    g = _check_grid(grid)
    return fit_intervals(n_state, [grid_interval(t, g) for t in first_seen], g)


def fit_intervals(n_state: Sequence[float], intervals: Sequence[tuple[float, float]],
                  grid: Sequence[float]) -> CensoredFit:
    """Maximum-likelihood fit of T_forget ~ a * N_S^b to grid measurements, with a 95% interval for b.

    Model: y_i = log2 T_forget_i = c + b x_i + sigma eps_i, x_i = log2 N_S_i, eps_i ~ Normal(0, 1),
    observed only as y_i in (log2 lo_i, log2 hi_i] (lo_i = 0 -> -inf, hi_i = inf -> +inf).
        log L(c, b, sigma) = sum_i log[ Phi((log2 hi_i - mu_i)/sigma) - Phi((log2 lo_i - mu_i)/sigma) ],
        mu_i = c + b x_i
    Steps:
        1. the intervals in log2 tokens (lo 0 -> -inf: left-censored; hi inf -> +inf: right-censored)
        2. start from least squares on interval midpoints (censored points one grid step outside)
        3. maximise log L over (c, b, log sigma) with Nelder-Mead (sigma >= SIGMA_FLOOR)
        4. profile likelihood for b: lp(b) = max over (c, sigma) of log L; the 95% interval is
           {b : 2 (log L_max - lp(b)) <= CHI2_1_95}, each end found by stepping out from b_hat and
           bisecting; an end not reached within SLOPE_SEARCH_SPAN is infinite.

    Args:
        n_state: N_S per measurement (state elements), (n,).
        intervals: per measurement, (lo, hi] in tokens that holds its T_forget (`grid_interval`,
            `verdict_interval`); lo 0 and hi inf are the censored ends.
        grid: the training lengths run, increasing (tokens): its spacing starts the fit.
    Returns:
        CensoredFit
    """
    ns = np.asarray(n_state, dtype=np.float64)
    if ns.ndim != 1 or ns.size != len(intervals):
        raise ValueError(f"n_state and intervals must be 1-D and of equal length, "
                         f"got {ns.shape} and {len(intervals)}")
    if not np.all(np.isfinite(ns)) or np.any(ns <= 0):
        raise ValueError(f"n_state must be finite and positive (state elements), got {ns.tolist()}")
    if np.unique(ns).size < 2:
        raise ValueError(f"a slope needs at least 2 distinct state sizes, got {np.unique(ns).tolist()}")
    g = _check_grid(grid)
    for lo_i, hi_i in intervals:
        if not 0.0 <= lo_i < hi_i:
            raise ValueError(f"each interval must be (lo, hi] with 0 <= lo < hi (tokens), got ({lo_i}, {hi_i})")
        if lo_i == 0.0 and math.isinf(hi_i):
            raise ValueError("an interval (0, inf) says nothing about T_forget (its likelihood is 1 for every line): "
                             "leave such measurements out of the fit and report them as uninformative")

    # 1. intervals in log2 tokens
    intervals = tuple((float(lo_i), float(hi_i)) for lo_i, hi_i in intervals)
    lo_t = np.array([lo for lo, _ in intervals])
    hi_t = np.array([hi for _, hi in intervals])
    with np.errstate(divide="ignore"):
        lo, hi = np.log2(lo_t), np.log2(hi_t)  # (n,): -inf / +inf at the censored ends
    x = np.log2(ns)  # (n,)

    def nll(c: float, b: float, log_sigma: float) -> float:
        sigma = max(math.exp(log_sigma), SIGMA_FLOOR)
        return -float(np.sum(interval_log_prob(lo, hi, c + b * x, sigma)))

    # 2. start: least squares on midpoints; censored points placed one grid step beyond the grid
    step = float(np.median(np.diff(np.log2(g))))
    mid = np.where(np.isinf(lo), hi - 0.5 * step, np.where(np.isinf(hi), lo + 0.5 * step, 0.5 * (lo + hi)))
    b0, c0 = np.polyfit(x, mid, 1)
    s0 = max(float(np.std(mid - (c0 + b0 * x))), 0.5 * step)

    # 3. the maximum (two restarts from the last optimum guard against a stalled simplex)
    theta, best = np.array([c0, b0, math.log(s0)]), math.inf
    for _ in range(3):
        theta, val = nelder_mead(lambda t: nll(*t), theta, step=[1.0, 0.25, 0.5])
        if best - val < 1e-7:
            best = min(best, val)
            break
        best = val
    c_hat, b_hat, ls_hat = (float(v) for v in theta)

    # 4. profile likelihood for b
    def profile(b: float) -> float:
        """max over (c, log sigma) of log L at fixed b; started at the (c, sigma) that fits b best."""
        c_start = float(np.median(mid - b * x))
        best_v = math.inf
        for start in ([c_start, ls_hat], [c_hat + (b_hat - b) * float(np.mean(x)), ls_hat]):
            _, v = nelder_mead(lambda t: nll(t[0], b, t[1]), start, step=[1.0, 0.5])
            best_v = min(best_v, v)
        return -best_v

    ll_max = -best
    cut = ll_max - 0.5 * CHI2_1_95

    def bound(direction: float) -> float:
        inside, width = b_hat, 0.05
        while width <= SLOPE_SEARCH_SPAN:
            trial = b_hat + direction * width
            if profile(trial) < cut:
                lo_b, hi_b = inside, trial  # the cut lies between them
                for _ in range(BISECT_STEPS):
                    m = 0.5 * (lo_b + hi_b)
                    if profile(m) >= cut:
                        lo_b = m
                    else:
                        hi_b = m
                    if abs(hi_b - lo_b) < BISECT_XTOL:
                        break
                return 0.5 * (lo_b + hi_b)
            inside, width = trial, width * 2.0
        return direction * math.inf

    ci = (bound(-1.0), bound(+1.0))
    return CensoredFit(slope=b_hat, intercept=c_hat, sigma=max(math.exp(ls_hat), SIGMA_FLOOR), slope_ci=ci,
                       log_likelihood=ll_max, n_points=int(ns.size),
                       n_left_censored=int(np.sum(np.isinf(lo))), n_right_censored=int(np.sum(np.isinf(hi))),
                       intervals=intervals)


# ----------------------------------------------------------------------------------------------
# 5. the paper's line, for reference
# ----------------------------------------------------------------------------------------------

def paper_prediction(n_state: float, with_intercept: bool = False) -> float:
    """Stuffed Mamba's T_forget for a state of n_state elements, in tokens.

    T_forget [K tokens] ~= 5.172 * N_S [M elements] - 4.469. The default is the proportional part,
    T = 5.172e-3 * N_S tokens (slope b = 1 on log-log axes), which is what extrapolates to toy states:
    the intercept makes the line negative below N_S ~= 0.86 M elements, far above our toy models.
    """
    if not math.isfinite(n_state) or n_state <= 0:
        raise ValueError(f"n_state must be a positive number of state elements, got {n_state}")
    k_tokens = PAPER_SLOPE_K_PER_M * n_state / 1e6 + (PAPER_INTERCEPT_K if with_intercept else 0.0)
    if k_tokens <= 0:
        raise ValueError(f"the paper's line with its intercept gives {k_tokens * 1e3:.0f} tokens at "
                         f"N_S = {n_state:.0f}: it was fitted on states of about 1 M elements and up; "
                         "use with_intercept=False (the proportional part) for smaller states")
    return k_tokens * 1e3
