"""Group-sequential error spending: how much of a comparison's error rate each look of a race may use.

A race looks at a comparison after n_1 < n_2 < ... < n_K paired seeds. A spending function alpha(t)
(Lan & DeMets 1983) says how much of the error rate alpha may have been spent by information
fraction t = n_k / n_K; look k spends the increment alpha(t_k) - alpha(t_(k-1)), the increments sum
to alpha. The boundary c_k of look k is the one a standardised mean crosses for the first time at
look k with exactly that probability when there is no difference -- computed with the correlation
between looks (the same seeds are in every later look) by the recursive numerical integration of
Armitage, McPherson & Rowe (1969), as in Jennison & Turnbull, *Group Sequential Methods*, ch. 19.
Because of that correlation, the later looks can use far more than their increment alone would give.

  obrien-fleming  alpha(t) = 2 - 2 Phi(z_(1-alpha/2) / sqrt t): almost nothing early, nearly all of it at
                  the last look, where the close calls are settled (the default)
  pocock          alpha(t) = alpha ln(1 + (e - 1) t): about even boundaries
  bonferroni      alpha / K at every look, no correlation used (the race's first rule)

The variance of a seed's difference is unknown: look k's interval is a t-interval at the boundary's
nominal level 2 (1 - Phi(c_k)) (Jennison & Turnbull, ch. 11). That is exact for known variance and
only approximate for 1-5 degrees of freedom; `python -m harness.decide` measures what it gives.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

SPENDING = ("obrien-fleming", "pocock", "bonferroni")
_GRID = 801  # points per look in the integration (Simpson): boundaries to ~1e-4 at 10 looks
_NEVER = 40.0  # a boundary for a look that spends nothing: never crossed


def _phi(x):
    return np.exp(-0.5 * np.square(x)) / math.sqrt(2 * math.pi)


def _cdf(x):
    from scipy.special import ndtr

    return ndtr(x)


def _quantile(p: float) -> float:
    from scipy.special import ndtri

    return float(ndtri(p))


def spent(kind: str, t: float, alpha: float) -> float:
    """Cumulative error rate spent by information fraction t in [0, 1] (two-sided)."""
    if t <= 0:
        return 0.0
    if t >= 1:
        return alpha
    if kind == "obrien-fleming":
        return float(2.0 - 2.0 * _cdf(_quantile(1.0 - alpha / 2.0) / math.sqrt(t)))
    if kind == "pocock":
        return alpha * math.log(1.0 + (math.e - 1.0) * t)
    raise ValueError(f"no spending function {kind!r}; choose one of {', '.join(SPENDING)}")


def increments(kind: str, looks: tuple[int, ...], alpha: float) -> list[float]:
    """The error rate each look spends; they sum to alpha."""
    if kind == "bonferroni":
        return [alpha / len(looks)] * len(looks)
    total = looks[-1]
    cumulative = [spent(kind, n / total, alpha) for n in looks]
    return [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative)]


def _simpson(a: float, b: float, m: int = _GRID) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(a, b, m)
    w = np.full(m, 2.0)
    w[1::2] = 4.0
    w[0] = w[-1] = 1.0
    return x, w * (b - a) / (3.0 * (m - 1))


def _exit_probability(x: np.ndarray, mass: np.ndarray, step: float, bound: float) -> float:
    """P(|S + X| >= bound) over the continuation mass of S on grid x, X ~ N(0, step)."""
    sd = math.sqrt(step)
    return float(np.sum(mass * (_cdf((-bound - x) / sd) + 1.0 - _cdf((bound - x) / sd))))


@lru_cache(maxsize=256)
def boundaries(kind: str, looks: tuple[int, ...], alpha: float) -> tuple[float, ...]:
    """Two-sided boundaries c_k (standardised-mean scale) of looks at `looks` seeds: with no
    difference, the first crossing happens at look k with probability increments(...)[k]."""
    from scipy.optimize import brentq

    spend = increments(kind, looks, alpha)
    if kind == "bonferroni":
        return tuple(_quantile(1.0 - a / 2.0) for a in spend)
    result: list[float] = []
    # grid and continuation mass (density x weights) of the sum S_k = sum of n_k differences; set at look 0
    x: np.ndarray = np.zeros(0)
    mass: np.ndarray = np.zeros(0)
    for k, (n, a) in enumerate(zip(looks, spend)):
        if k == 0:
            c = _quantile(1.0 - a / 2.0) if a > 1e-15 else _NEVER
        else:
            step = n - looks[k - 1]
            if a <= 1e-15:
                c = _NEVER
            else:
                f = lambda c: _exit_probability(x, mass, step, c * math.sqrt(n)) - a  # noqa: E731, B023 (solved here)
                c = brentq(f, 1e-3, _NEVER, xtol=1e-7) if f(1e-3) > 0 else 1e-3
        result.append(min(c, _NEVER))
        # The sum's density on (-c sqrt n, c sqrt n) given no crossing so far, for the next look.
        new_x, w = _simpson(-min(c, 8.0) * math.sqrt(n), min(c, 8.0) * math.sqrt(n))
        if k == 0:
            density = _phi(new_x / math.sqrt(n)) / math.sqrt(n)
        else:
            sd = math.sqrt(n - looks[k - 1])
            density = (mass[None, :] * _phi((new_x[:, None] - x[None, :]) / sd) / sd).sum(axis=1)
        x, mass = new_x, density * w
    return tuple(result)


def nominal_levels(kind: str, looks: tuple[int, ...], alpha: float) -> tuple[float, ...]:
    """Two-sided level of each look's interval: 1 - confidence of the t-interval at look k."""
    return tuple(float(2.0 * (1.0 - _cdf(c))) for c in boundaries(kind, tuple(looks), alpha))
