r"""Inverse-curvature backends as objects (lineax style): each backend is a frozen dataclass of
its own hyperparameters with ``prepare(curvature, damping) -> InverseCurvature`` (once) and
``apply(inverse, rhs) -> solvers.Solution`` (per request, all right-hand sides in one batched
computation). Every backend, approximate ones too, reports the *true* relative residual
:math:`\lVert b - (H+\lambda_dI)x\rVert/\lVert b\rVert` against the exact damped operator.

=============  ==============================================  ==================================
backend        prepare                                         apply
=============  ==============================================  ==================================
``Exact``      dense curvature (the closed form the task        two triangular solves (exact)
               declares, on its coupled coordinates) + Cholesky
``CG``         nothing                                         block CG over all right-hand sides
                                                               (``block=False``: vmapped CG); exact
``NystromPCG`` rank-``rank`` Nyström approximation              preconditioned block CG; exact
``EKFACPCG``   EK-FAC factors (dense layers)                   EK-FAC-preconditioned CG; exact
``EKFAC``      EK-FAC factors                                  the Kronecker-factored inverse
``KFAC``       K-FAC factors                                   the Kronecker-factored inverse
``Arnoldi``    top-``rank`` eigenpairs (Lanczos)               projection (Schioppa et al. 2022)
``LiSSA``      scale from a Lanczos estimate                   ``depth`` steps of the recursion
=============  ==============================================  ==================================

The curvature is that of the mean-normalised objective of ``unlearn.objective`` at ``params``:
:class:`Curvature` names the tuple ``(apply, params, x, y, w, l2)`` and which matrix — the
Hessian or the Gauss–Newton matrix (PSD for any network) — with the task's loss carried by
``apply``. :func:`backend` builds a backend from its name (:data:`BACKENDS`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from unlearn import curvature as curv_lib
from unlearn import kfac, solvers

Array = jax.Array
Params = Any
Apply = Callable[[Params, Array], Array]


class Curvature(NamedTuple):
    """The curvature of :math:`L(\\theta; w) = \\sum w_i\\ell_i/\\max(\\sum w, 1) +
    \\tfrac{\\lambda}{2}\\lVert\\theta\\rVert^2` at ``params``: ``kind`` ``"hessian"`` or
    ``"ggn"``; eval-mode ``apply`` (``models.frozen_apply`` for models with state) carries the
    task's loss and declared structure; ``w`` defaults to ones."""

    apply: Apply
    params: Params
    x: Array
    y: Array
    l2: float
    w: Array | None = None
    kind: str = "hessian"

    @property
    def theta(self) -> Array:
        return ravel_pytree(self.params)[0]

    @property
    def weights(self) -> Array:
        theta = self.theta
        return (jnp.ones(self.x.shape[0], theta.dtype) if self.w is None
                else jnp.asarray(self.w, theta.dtype))

    @property
    def product(self) -> Callable[..., Any]:
        if self.kind not in ("hessian", "ggn"):
            raise ValueError(f"kind={self.kind!r}: choose 'hessian' or 'ggn'.")
        return curv_lib.hvp if self.kind == "hessian" else curv_lib.ggn_vp

    def operator(self, damping: float = 0.0, l2: float | None = None) -> Any:
        """``v -> (H + damping I) v`` (with the L2 term unless ``l2`` overrides it)."""
        return self.product(self.apply, self.params, self.x, self.y, self.weights,
                            self.l2 if l2 is None else l2, damping)


# --------------------------------------------------------------------------------------------
# The dense curvature, from the declared structure
# --------------------------------------------------------------------------------------------


def declared_curvature(apply: Apply):
    """The closed-form curvature the task of ``apply`` declares (``None`` if none)."""
    return getattr(apply, "curvature", None)


def is_linear_model(apply: Apply) -> bool:
    """Declared softmax or binary logistic regression (the coupled-coordinate closed form)."""
    return declared_curvature(apply) in ("softmax_regression", "binary_logistic")


def full_hessian(apply: Apply, params: Params, x: Array, y: Array, w: Array,
                 l2: float) -> Array:
    """Dense :math:`\\nabla^2 L(\\theta; w)` over the flat params.

    The closed form the task *declares* (``task.curvature`` on ``apply``:
    ``"softmax_regression"`` → ``curvature.softmax_regression_hessian``, ``"binary_logistic"``
    → ``curvature.binary_logistic_hessian``, or the task's own ``hessian(params, x, y, w, l2)``
    function); otherwise the chunked autodiff ``curvature.hessian``. Never guessed from the
    parameter shapes: a linear head on fixed features has the shapes of softmax regression
    and a different Hessian.
    """
    kind = declared_curvature(apply)
    if kind == "softmax_regression":
        return curv_lib.softmax_regression_hessian(params, x, w, l2)
    if kind == "binary_logistic":
        return curv_lib.binary_logistic_hessian(params, x, w, l2)
    if callable(kind):
        return jnp.asarray(kind(params, x, y, w, l2))
    return curv_lib.hessian(apply, params, x, y, w, l2)


def _active_features(x: Array, w: Array) -> np.ndarray:
    """Indices of the input features that are non-zero on some example of positive weight."""
    xn = np.asarray(x).reshape(np.shape(x)[0], -1)
    return np.flatnonzero(np.any(xn[np.asarray(w) > 0] != 0, axis=0))


def coupled_coordinates(params: Params, x: Array,
                        w: Array) -> tuple[Params, Array, np.ndarray | None]:
    r"""The *coupled* part of softmax (or binary logistic) regression: its params and inputs
    without the features that are zero on every example of positive weight, and the flat
    indices of the kept coordinates (``None`` when every feature is kept).

    The weight of input feature :math:`a` enters the loss only through :math:`x_{ia}`: when
    :math:`x_{ia} = 0` on every example of positive weight, its rows of :math:`H` are zero
    off the diagonal and it *decouples* with curvature :math:`\lambda` (e.g. the 124 of 784
    MNIST pixels that are black in every image of ``mnist5k``). The closed-form Hessian of the
    returned params on the returned inputs is therefore exactly :math:`H` on the kept
    coordinates, and the factorisation shrinks from :math:`p` to their number
    (:class:`DecoupledCholesky`). Valid for declared linear models only.
    """
    active = _active_features(x, w)
    xf = jnp.asarray(x).reshape(np.shape(x)[0], -1)
    if active.size == xf.shape[1]:
        return params, xf, None
    leaves, treedef = jax.tree.flatten(params)
    offsets = np.cumsum([0] + [np.size(a) for a in leaves])
    idx, kept = [], []
    for leaf, off in zip(leaves, offsets[:-1], strict=True):
        flat = np.arange(off, off + np.size(leaf)).reshape(np.shape(leaf))
        if np.ndim(leaf) == 2:  # the (d, K) kernel: keep the active rows
            flat, leaf = flat[active], leaf[active]
        idx.append(flat.reshape(-1))
        kept.append(leaf)
    return jax.tree.unflatten(treedef, kept), xf[:, active], np.concatenate(idx)


class DecoupledCholesky(NamedTuple):
    r"""Exact inverse of a damped curvature with decoupled coordinates: the Cholesky factor
    on the coupled flat indices ``index``, and ``shift`` (L2 + damping), the curvature of
    every other coordinate (:func:`coupled_coordinates`)."""

    cholesky: solvers.CholeskyFactor
    index: Array
    shift: Array


@jax.jit
def _decoupled_solve(f: DecoupledCholesky, rhs: Array) -> Array:
    """``(H + λ_d I)^{-1}`` on the rows of ``rhs`` ``(m, p)``."""
    inner = solvers.cholesky_solve(f.cholesky, rhs[:, f.index].T).T
    return (rhs / f.shift).at[:, f.index].set(inner)


# --------------------------------------------------------------------------------------------
# The backends
# --------------------------------------------------------------------------------------------


class InverseCurvature(NamedTuple):
    r"""A prepared :math:`(H + \lambda_d I)^{-1}`: the ``backend`` that made it, the damped
    operator ``op`` (for CG/LiSSA and every true residual), the backend's ``state`` and the
    wall time of the preparation."""

    backend: Backend
    op: Any
    state: Any
    prepare_seconds: float

    def apply(self, rhs: Array) -> solvers.Solution:
        """:meth:`Backend.apply` of this inverse to the rows of ``rhs``."""
        return self.backend.apply(self, rhs)


@jax.jit
def _batched_residual(op: Any, xs: Array, rhs: Array) -> tuple[Array, Array]:
    """True relative residual of every row, one compiled batched product (``op`` is a
    ``Partial``, traced as data; eagerly each primitive of the product compiles on its own)."""
    res = jax.vmap(lambda xx, bb: solvers._rel_residual(op, xx, bb))(xs, rhs)
    return res, jnp.all(jnp.isfinite(xs), axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class Backend:
    """Base of the backends: ``prepare`` times the backend's ``_prepare``; ``apply`` runs its
    ``_solve`` on all rows at once and attaches the true residual. ``exact`` backends converge
    when the residual is below ``tol``; approximate ones when the result is finite (their
    residual is their error)."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True

    def prepare(self, curvature: Curvature, damping: float = 0.0) -> InverseCurvature:
        t0 = time.perf_counter()
        op = curvature.operator(damping)
        state = self._prepare(curvature, float(damping), op)
        jax.block_until_ready(state)
        return InverseCurvature(self, op, state, time.perf_counter() - t0)

    def apply(self, inverse: InverseCurvature, rhs: Array) -> solvers.Solution:
        rhs = jnp.asarray(rhs)
        if rhs.ndim != 2:
            raise ValueError(f"rhs must be (m, p) right-hand sides as rows; got {rhs.shape}")
        sol = self._solve(inverse, rhs)
        if isinstance(sol, solvers.Solution):
            return sol
        xs, its, method = sol
        res, finite = _batched_residual(inverse.op, xs, rhs)
        tol = getattr(self, "tol", None) or (1e-8 if rhs.dtype == jnp.float64 else 1e-4)
        # On the host: eager jnp comparisons would each compile a program on a cold call.
        conv = jnp.asarray(np.asarray(res) <= tol if self.exact else np.asarray(finite))
        msg = "" if self.exact else ("approximate inverse: converged means finite; residual is "
                                     "its error")
        return solvers.Solution(xs, jnp.asarray(its, jnp.int32), res, conv, method, msg)

    def _prepare(self, curvature: Curvature, damping: float, op: Any) -> Any:
        return None

    def _solve(self, inverse: InverseCurvature, rhs: Array):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class Exact(Backend):
    """Dense curvature + Cholesky: the closed form on the coupled coordinates for declared
    linear models, ``jax.hessian``-style autodiff (Hessian) or ``J^T H_out J`` (GGN) otherwise.
    ``hessian``: a precomputed dense curvature. :math:`O(p^2)` memory; refused above twice
    ``solvers.LAPACK_THREADED_LIMIT`` (coupled) parameters."""

    hessian: Array | None = None
    tol: float | None = None
    name: ClassVar[str] = "exact"

    def _prepare(self, c: Curvature, damping: float, op: Any) -> Any:
        theta, w = c.theta, c.weights
        p = theta.size
        hessian, index, order = self.hessian, None, p
        limit = 2 * solvers.LAPACK_THREADED_LIMIT
        linear = hessian is None and is_linear_model(c.apply)
        if linear:  # the closed form (GGN = Hessian for these models)
            reduced, x_coupled, index = coupled_coordinates(c.params, c.x, w)
            order = p if index is None else index.size
        if hessian is None and order > limit:
            coupled = "" if order == p else f"; {p} parameters, {order} coupled"
            raise ValueError(
                f"backend='exact' needs a dense {order}×{order} curvature "
                f"({8 * order**2 / 2**30:.1f} GiB in float64{coupled}) and its factorisation; "
                f"above {limit} parameters use backend='pcg' or 'cg' (the same answer, "
                "matrix-free), or 'ekfac'/'arnoldi' (approximate).")
        if linear:
            hessian = full_hessian(c.apply, reduced, x_coupled, c.y, w, c.l2)
        elif hessian is None:
            hessian = (full_hessian(c.apply, c.params, c.x, c.y, w, c.l2)
                       if c.kind == "hessian" else
                       jax.vmap(c.operator())(jnp.eye(p, dtype=theta.dtype)))
        factor = solvers.cholesky_factor(hessian, damping)
        if index is not None:
            factor = DecoupledCholesky(factor, jnp.asarray(index),
                                       jnp.asarray(c.l2 + damping, theta.dtype))
        return factor

    def _solve(self, inv: InverseCurvature, rhs: Array):
        f = inv.state
        xs = (_decoupled_solve(f, rhs) if isinstance(f, DecoupledCholesky)
              else solvers.cholesky_solve(f, rhs.T).T)
        return xs, jnp.zeros(rhs.shape[0], jnp.int32), "cholesky"


@dataclasses.dataclass(frozen=True, eq=False)
class CG(Backend):
    """Conjugate gradients on the exact damped operator; with ``block`` all right-hand sides
    share one Krylov space (``solvers.cg(..., block=True)``), else the ``vmap``-ed single CG.
    ``precond``: a fixed preconditioner ``v -> M v`` (e.g. a cached Nyström one)."""

    tol: float | None = None
    maxiter: int | None = None
    block: bool = True
    precond: Any = None
    name: ClassVar[str] = "cg"

    def _preconditioner(self, inv: InverseCurvature) -> Any:
        return self.precond

    def _solve(self, inv: InverseCurvature, rhs: Array):
        m = rhs.shape[0]
        return solvers.cg(inv.op, rhs, tol=self.tol, maxiter=self.maxiter,
                          precond=self._preconditioner(inv),
                          block=self.block and 1 < m < rhs.shape[1])


@dataclasses.dataclass(frozen=True, eq=False)
class NystromPCG(CG):
    """CG preconditioned by a rank-``rank`` randomized Nyström approximation of the data term
    (``rank`` batched products at prepare; Frangella et al. 2023). Exact answer."""

    rank: int = 100
    key: Array | None = None
    name: ClassVar[str] = "pcg"

    def _prepare(self, c: Curvature, damping: float, op: Any) -> Any:
        theta = c.theta
        ny = solvers.nystrom(c.operator(0.0, l2=0.0), theta, min(self.rank, theta.size - 1),
                             self.key)
        return solvers.nystrom_preconditioner(ny, c.l2 + damping)

    def _preconditioner(self, inv: InverseCurvature) -> Any:
        return inv.state


def _factors(backend, c: Curvature) -> kfac.KFACFactors:
    key = None
    if backend.samples is not None:
        key = jax.random.PRNGKey(0) if backend.key is None else backend.key
    return kfac.kfac_factors(c.apply, c.params, c.x, c.weights, chunk_size=backend.chunk_size,
                             y=c.y, samples=backend.samples, key=key)


@dataclasses.dataclass(frozen=True, eq=False)
class EKFACPCG(CG):
    """CG preconditioned by the EK-FAC inverse (dense layers). Exact answer. ``samples``:
    None for the exact output-Hessian roots, ``k`` for ``k`` sampled labels per example
    drawn from ``key`` (``kfac.kfac_factors``; cheaper factors, the answer stays exact)."""

    chunk_size: int = 1024
    samples: int | None = None
    key: Array | None = None
    name: ClassVar[str] = "pcg-ekfac"

    def _prepare(self, c: Curvature, damping: float, op: Any) -> Any:
        return kfac.kfac_inverse(_factors(self, c), c.params, c.l2 + damping, "ekfac")

    def _preconditioner(self, inv: InverseCurvature) -> Any:
        return inv.state


@dataclasses.dataclass(frozen=True, eq=False)
class EKFAC(Backend):
    """The eigenvalue-corrected Kronecker-factored inverse of the GGN (George et al. 2018;
    Grosse et al. 2023), dense layers only. Approximate. ``samples``/``key``: sampled-label
    factors (as :class:`EKFACPCG`; None: exact roots)."""

    chunk_size: int = 1024
    samples: int | None = None
    key: Array | None = None
    name: ClassVar[str] = "ekfac"
    exact: ClassVar[bool] = False
    variant: ClassVar[str] = "ekfac"

    def _prepare(self, c: Curvature, damping: float, op: Any) -> Any:
        return kfac.kfac_inverse(_factors(self, c), c.params, c.l2 + damping, self.variant)

    def _solve(self, inv: InverseCurvature, rhs: Array):
        return jax.vmap(inv.state)(rhs), jnp.zeros(rhs.shape[0], jnp.int32), self.name


@dataclasses.dataclass(frozen=True, eq=False)
class KFAC(EKFAC):
    """The Kronecker-factored inverse without the eigenvalue correction. Approximate."""

    name: ClassVar[str] = "kfac"
    variant: ClassVar[str] = "kfac"


@dataclasses.dataclass(frozen=True, eq=False)
class Arnoldi(Backend):
    """Projection on the top-``rank`` eigenpairs from ``2·rank + 20`` Lanczos steps
    (Schioppa et al. 2022). Approximate."""

    rank: int = 100
    key: Array | None = None
    name: ClassVar[str] = "arnoldi"
    exact: ClassVar[bool] = False

    def _prepare(self, c: Curvature, damping: float, op: Any) -> Any:
        theta = c.theta
        p = theta.size
        eig = solvers.lanczos_topk(op, theta, min(self.rank, p),
                                   steps=min(p, 2 * self.rank + 20), key=self.key)
        if float(eig[0][-1]) <= 0:
            raise ValueError("arnoldi: a kept eigenvalue of the damped curvature is <= 0; "
                             "add damping or use curvature kind 'ggn'.")
        return eig

    def _solve(self, inv: InverseCurvature, rhs: Array):
        vals, vecs = inv.state
        xs = ((rhs @ vecs) / vals) @ vecs.T
        return xs, jnp.full(rhs.shape[0], vals.shape[0], jnp.int32), "arnoldi"


@functools.partial(jax.jit, static_argnames=("depth",))
def _lissa_batched(hvp_batch: Callable, rhs: Array, scale: Array, keys: Array, depth: int):
    """x_j = b + x_{j-1} - H_j x_{j-1} / s for all rows at once; returns x_depth / s."""

    def step(xs, key):
        hx = hvp_batch(xs, key)
        return rhs + xs - hx / scale, None

    xs, _ = jax.lax.scan(step, rhs, keys[:depth])
    return xs / scale


def _lissa_hvp(fn, apply, batch, params, x, y, w, l2, damping, xs, key):
    if batch is None:
        mask = w
    else:
        idx = jax.random.choice(key, x.shape[0], (batch,), replace=False)
        mask = jnp.zeros_like(w).at[idx].set(w[idx])
    op = fn(apply, params, x, y, mask, l2, damping)
    return jax.vmap(op)(xs)


@functools.lru_cache(maxsize=32)
def _lissa_fn(fn, apply, batch):
    return functools.partial(_lissa_hvp, fn, apply, batch)


class _LissaState(NamedTuple):
    scale: float
    curvature: Curvature
    damping: float


@dataclasses.dataclass(frozen=True, eq=False)
class LiSSA(Backend):
    """``depth`` steps of the LiSSA recursion (Agarwal et al. 2017; Koh & Liang 2017) on
    minibatches of ``batch`` examples (full batch if None), scaled by 1.5 × a Lanczos estimate
    of the largest eigenvalue unless ``scale`` is given. Approximate, stochastic (keys from
    ``key``)."""

    depth: int = 200
    batch: int | None = None
    key: Array | None = None
    scale: float | None = None
    name: ClassVar[str] = "lissa"
    exact: ClassVar[bool] = False

    def _prepare(self, c: Curvature, damping: float, op: Any) -> Any:
        if self.scale is not None:
            return _LissaState(float(self.scale), c, damping)
        _, lam_max = solvers.lanczos_extremes(op, c.theta, steps=min(30, c.theta.size))
        return _LissaState(1.5 * float(lam_max), c, damping)

    def _solve(self, inv: InverseCurvature, rhs: Array):
        s = inv.state
        c = s.curvature
        hv = jax.tree_util.Partial(
            _lissa_fn(c.product, c.apply, self.batch), c.params, c.x, c.y, c.weights,
            jnp.asarray(c.l2), jnp.asarray(s.damping))
        key = jax.random.PRNGKey(0) if self.key is None else self.key
        keys = jax.random.split(key, self.depth)
        xs = _lissa_batched(hv, rhs, jnp.asarray(s.scale, rhs.dtype), keys, depth=self.depth)
        return xs, jnp.full(rhs.shape[0], self.depth, jnp.int32), "lissa"


BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (Exact, CG, NystromPCG, EKFACPCG, EKFAC, KFAC, Arnoldi, LiSSA)}


def backend(name: str, **options: Any) -> Backend:
    """The backend called ``name`` (:data:`BACKENDS`) with those ``options`` it takes
    (``tol``, ``maxiter``, ``block``, ``rank``, ``key``, ``chunk_size``, ``samples``, ``depth``,
    ``batch``,
    ``hessian``); one option set can serve every backend, the others are not used."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: choose one of {tuple(BACKENDS)}.")
    cls = BACKENDS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in fields})


__all__ = ["BACKENDS", "CG", "EKFAC", "EKFACPCG", "KFAC", "Arnoldi", "Backend", "Curvature",
           "DecoupledCholesky", "Exact", "InverseCurvature", "LiSSA", "NystromPCG", "backend",
           "coupled_coordinates", "declared_curvature", "full_hessian", "is_linear_model"]
