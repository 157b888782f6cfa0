"""The 1-D binary toy problem of the paper's Figures 1-3 and 6: data, model, risks, training.

Data (our choice; the paper does not give its formula), x in the support [-5, 5]:
    p_d(x)     = (N(x; -2.5, 1) + N(x; 2.5, 1)) / 2, truncated to [-5, 5] and renormalised;
    p_d(y=1|x) = sigmoid(x).
Most of the mass sits on the two plateaus (p_d(y=1|x) near 0.08 and 0.92 at the modes), the
transition between them is smooth, and p_d changes moderately within the threat set
B(x) = {x' : |x' - x| <= 1} intersected with the support.

Discretisation. Inputs live on the grid G = {-5, -4.98, ..., 5} (step h = 0.02, 501 points);
samples are rounded to G, so that every x' = x + j h (|j| <= 50: 101 offsets, 0 included) is a
point of G. The model is evaluated once per step on G, and each inner max over B(x) is an exact
max over the 101 grid points of the window (indices clipped at the ends of G, which repeats the
end point and so restricts B(x) to the support without changing the max). Samples that round to
the same grid point have identical terms, so the per-sample mean equals sum_k w_k r_k with w_k
the fraction of samples at grid point k: 60,000 samples cost no more than 6.

Every risk of every kind uses the same windows, so Theorems 1-3 (pointwise arguments about the
max) hold exactly for the grid maxima, not only up to the grid resolution.

Risks (2-class distributions written (p, 1 - p); D = `score_jax.losses.divergence(., ., kind)`,
the target p_d first, the soft label p_d(.|x) in place of a sampled y):
    R_Standard = E_x D(p_d(.|x) || p_t(.|x))
    R_Madry    = E_x max_{x' in B(x)} D(p_d(.|x)  || p_t(.|x'))      (eq. 3 / 5)
    R_SCORE    = E_x max_{x' in B(x)} D(p_d(.|x') || p_t(.|x'))      (eq. 4 / 6)
    C_D        = E_x max_{x' in B(x)} D(p_d(.|x)  || p_d(.|x'))
    R_TRADES   = E_x [D(p_d(.|x) || p_t(.|x)) + beta max_{x' in B(x)} D(p_t(.|x) || p_t(.|x'))]
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_jax.losses import divergence

Array = jax.Array

SUPPORT = (-5.0, 5.0)
RADIUS = 1.0
GRID_STEP = 0.02
MODES = (-2.5, 2.5)  # the two equally weighted Gaussian modes of p_d(x)
MODE_STD = 1.0
SLOPE = 1.0  # p_d(y=1|x) = sigmoid(SLOPE x)
HIDDEN = 32
LEARNING_RATE = 1e-3
STEPS = 500


# ----------------------------------------------------------------------------------- data
def pd_prob(x: np.ndarray) -> np.ndarray:
    """p_d(y=1|x) = sigmoid(SLOPE x), float64."""
    return 1.0 / (1.0 + np.exp(-SLOPE * np.asarray(x, np.float64)))


def marginal_density(x: np.ndarray) -> np.ndarray:
    """p_d(x) = (N(x; -2.5, 1) + N(x; 2.5, 1)) / 2 / mass on [-5, 5] (0 outside the support)."""
    x = np.asarray(x, np.float64)
    gauss = sum(np.exp(-0.5 * ((x - m) / MODE_STD) ** 2) for m in MODES)
    gauss = gauss / (len(MODES) * MODE_STD * math.sqrt(2.0 * math.pi))
    cdf = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    lo, hi = SUPPORT
    mass = sum(cdf((hi - m) / MODE_STD) - cdf((lo - m) / MODE_STD) for m in MODES) / len(MODES)
    return np.where((x >= lo) & (x <= hi), gauss / mass, 0.0)


def sample_x(rng: np.random.Generator, n: int) -> np.ndarray:
    """n draws of x ~ p_d(x) (mixture of the two modes, rejection to the support)."""
    out = np.empty((0,), np.float64)
    while out.size < n:
        m = rng.choice(np.asarray(MODES), size=2 * n)
        x = m + MODE_STD * rng.standard_normal(2 * n)
        out = np.concatenate([out, x[(x >= SUPPORT[0]) & (x <= SUPPORT[1])]])
    return out[:n]


@dataclasses.dataclass(frozen=True)
class Grid:
    """The input grid G, the window indices of B(x) for every grid point, and p_d on G."""

    x: np.ndarray  # (N,) grid points
    window: np.ndarray  # (N, 2K+1) indices of the grid points within RADIUS (clipped to G)
    pd: np.ndarray  # (N,) p_d(y=1|x) on G

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


def make_grid(step: float = GRID_STEP, radius: float = RADIUS) -> Grid:
    """G = {lo + i h}; window[k] = clip(k + (-K..K), 0, N-1), K = radius / h."""
    lo, hi = SUPPORT
    n = int(round((hi - lo) / step)) + 1
    k = int(round(radius / step))
    if abs(k * step - radius) > 1e-9:
        raise ValueError(f"radius {radius} must be a multiple of the grid step {step}")
    x = lo + step * np.arange(n, dtype=np.float64)
    window = np.clip(np.arange(n)[:, None] + np.arange(-k, k + 1)[None, :], 0, n - 1)
    return Grid(x=x, window=window, pd=pd_prob(x))


def sample_weights(grid: Grid, x: np.ndarray) -> np.ndarray:
    """w_k = (number of samples that round to grid point k) / (number of samples)."""
    step = grid.x[1] - grid.x[0]
    k = np.clip(np.round((np.asarray(x) - grid.x[0]) / step).astype(int), 0, grid.size - 1)
    return np.bincount(k, minlength=grid.size).astype(np.float64) / len(k)


# ----------------------------------------------------------------------------------- risks
def two_class(p: Array) -> Array:
    """(p, 1 - p) on a new last axis: the distribution over (y=1, y=0)."""
    return jnp.stack([p, 1.0 - p], axis=-1)


def per_point_risks(q: Array, pd: Array, window: Array, kind: str) -> dict[str, Array]:
    """Standard, Madry and SCORE terms at every grid point k (x = G_k, x' over the window of k).

    standard_k = D(P_k || Q_k); madry_k = max_j D(P_k || Q_{w_kj}); score_k = max_j standard_{w_kj},
    with P = (p_d, 1 - p_d), Q = (p_t, 1 - p_t) and w_kj the window indices.
    """
    big_p, big_q = two_class(pd), two_class(q)
    standard = divergence(big_p, big_q, kind)
    return {
        "standard": standard,
        "madry": jnp.max(divergence(big_p[:, None], big_q[window], kind), axis=-1),
        "score": jnp.max(standard[window], axis=-1),
    }


def per_point_c(pd: Array, window: Array, kind: str) -> Array:
    """C_k = max_j D(P_k || P_{w_kj}): how much p_d changes within B(G_k)."""
    big_p = two_class(pd)
    return jnp.max(divergence(big_p[:, None], big_p[window], kind), axis=-1)


def risks(q: Array, pd: Array, window: Array, weights: Array, kind: str) -> dict[str, Array]:
    """R_Standard, R_Madry, R_SCORE (sum_k w_k r_k of `per_point_risks`) and C_D."""
    out = {k: v @ weights for k, v in per_point_risks(q, pd, window, kind).items()}
    out["C"] = per_point_c(pd, window, kind) @ weights
    return out


def trades_risk(
    q: Array, pd: Array, window: Array, weights: Array, kind: str, beta: float
) -> Array:
    """R_TRADES(beta) = sum_k w_k [D(P_k || Q_k) + beta max_j D(Q_k || Q_{w_kj})]."""
    big_p, big_q = two_class(pd), two_class(q)
    natural = divergence(big_p, big_q, kind)
    robust = jnp.max(divergence(big_q[:, None], big_q[window], kind), axis=-1)
    return (natural + beta * robust) @ weights


# ----------------------------------------------------------------------------------- model
class MLP(nn.Module):
    """p_t(y=1|x) = sigmoid(Dense(tanh(Dense(tanh(Dense(x / 5)))))): two hidden layers."""

    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = x[:, None] / SUPPORT[1]
        h = nn.tanh(nn.Dense(self.hidden)(h))
        h = nn.tanh(nn.Dense(self.hidden)(h))
        return nn.sigmoid(nn.Dense(1)(h))[:, 0]


def init_params(seed: int, hidden: int = HIDDEN) -> dict:
    """Flax default initialisation (lecun-normal kernels, zero biases)."""
    return MLP(hidden).init(jax.random.PRNGKey(seed), jnp.zeros((1,), jnp.float32))


@dataclasses.dataclass(frozen=True)
class Problem:
    """A training problem: the grid, the sample weights, and p_d on the grid as jax arrays."""

    grid: Grid
    weights: np.ndarray

    def arrays(self, dtype: jnp.dtype = jnp.float32) -> tuple[Array, Array, Array, Array]:
        """(x, p_d, window, weights) on the grid as jax arrays of `dtype` (window: int)."""
        g = self.grid
        return (
            jnp.asarray(g.x, dtype),
            jnp.asarray(g.pd, dtype),
            jnp.asarray(g.window),
            jnp.asarray(self.weights, dtype),
        )


def make_problem(num_samples: int, seed: int = 0, grid: Grid | None = None) -> Problem:
    """Problem with num_samples draws of x ~ p_d(x), rounded to the grid."""
    grid = make_grid() if grid is None else grid
    x = sample_x(np.random.default_rng(seed), num_samples)
    return Problem(grid=grid, weights=sample_weights(grid, x))


def problem_from_points(points: np.ndarray, grid: Grid | None = None) -> Problem:
    """Problem whose inputs are the given points (rounded to the grid), equally weighted."""
    grid = make_grid() if grid is None else grid
    return Problem(grid=grid, weights=sample_weights(grid, np.asarray(points, np.float64)))


# ----------------------------------------------------------------------------------- training
OBJECTIVES = ("standard", "madry", "score")


def constants(problem: Problem, kinds: tuple[str, ...]) -> dict[str, float]:
    """{f"C_{kind}": C_D} for the problem's sample weights."""
    _, pd, window, weights = problem.arrays()
    return {f"C_{k}": float(per_point_c(pd, window, k) @ weights) for k in kinds}


@functools.partial(
    jax.jit, static_argnames=("kind", "track_kinds", "steps", "learning_rate", "hidden")
)
def _run(
    params: dict,
    coef: Array,
    x: Array,
    pd: Array,
    window: Array,
    weights: Array,
    *,
    kind: str,
    track_kinds: tuple[str, ...],
    steps: int,
    learning_rate: float,
    hidden: int,
) -> tuple[dict, dict[str, Array]]:
    """`steps` Adam steps on sum_i coef_i R_i (R = standard, Madry, SCORE with `kind`) in a scan."""
    model = MLP(hidden)
    opt = optax.adam(learning_rate)

    def loss(p: dict) -> Array:
        r = per_point_risks(model.apply(p, x), pd, window, kind)
        return sum(coef[i] * (r[name] @ weights) for i, name in enumerate(OBJECTIVES))

    def record(p: dict) -> dict[str, Array]:
        q = model.apply(p, x)
        out = {"loss": loss(p)}
        for k in track_kinds:
            for name, value in per_point_risks(q, pd, window, k).items():
                out[f"{name}_{k}"] = value @ weights
        return out

    def step(carry, _):
        p, opt_state = carry
        metrics = record(p)
        grads = jax.grad(loss)(p)
        updates, opt_state = opt.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), metrics

    (params, _), hist = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    last = record(params)
    return params, {k: jnp.concatenate([v, last[k][None]]) for k, v in hist.items()}


def train(
    problem: Problem,
    objective: str,
    kind: str,
    track_kinds: tuple[str, ...] = (),
    *,
    steps: int = STEPS,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    hidden: int = HIDDEN,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Full-batch Adam on R_objective (with divergence `kind`) from the init of `seed`.

    One jitted `lax.scan` over the steps; the objective is a runtime one-hot, so runs that differ
    only in it (or in the data weights) share one compilation. Returns the final params and the
    history: "loss" and f"{risk}_{k}" for k in track_kinds, entry t at the parameters after t
    updates (t = 0..steps).
    """
    coef = jnp.asarray([float(objective == name) for name in OBJECTIVES], jnp.float32)
    if not coef.any():
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    x, pd, window, weights = problem.arrays()
    params, hist = _run(
        init_params(seed, hidden),
        coef,
        x,
        pd,
        window,
        weights,
        kind=kind,
        track_kinds=tuple(track_kinds),
        steps=steps,
        learning_rate=learning_rate,
        hidden=hidden,
    )
    return params, {k: np.asarray(v, np.float64) for k, v in hist.items()}


@functools.partial(jax.jit, static_argnames=("hidden",))
def predict(params: dict, x: Array, hidden: int = HIDDEN) -> Array:
    """p_t(y=1|x) for a batch of scalar inputs."""
    return MLP(hidden).apply(params, x)
