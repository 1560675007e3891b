"""A :class:`Task`: the model, its per-example loss, what influence measures, and declared
structure — the one object every layer of the library accepts (engine, ``train``, curvature,
influence backends, methods, SISA, evaluation).

Build one from your own model (kronfluence's ``Task`` + ``prepare_model``, dattri's
``AttributionTask``, in one object)::

    task = unlearn.task.from_linen(MyModule(), loss="cross_entropy")       # flax linen
    task = unlearn.task.from_nnx(lambda rngs: MyNNX(rngs=rngs))            # flax NNX
    task = unlearn.task.from_functions(init, apply, loss="squared_error")  # plain functions

The contract of the two functions is the package's (``unlearn.models`` docstring):
``variables = task.init(key, x)`` is a dict of collections with ``"params"``;
``task.apply(variables, x)`` is the deterministic eval mode; ``task.apply(variables, x,
train=True, rng=key)`` returns ``(outputs, new_state)``.

**Loss** (:class:`unlearn.objective.Loss`): ``"cross_entropy"`` (integer labels),
``"sequence_cross_entropy"`` (logits ``(n, T, V)``, targets ``(n, T)``, negative = padding),
``"squared_error"``, or a function ``fn(outputs, y) -> (n,)``. **Measure**: what influence
explains — ``"loss"`` (default), ``"margin"`` or a function. **Structure is declared, never
guessed**: ``convex=True`` promises a strictly convex L2-regularised objective (Newton's exact
path and certified removal rely on it); ``curvature`` names a closed-form Hessian
(``"softmax_regression"``, ``"binary_logistic"``) or is a function ``hessian(params, x, y, w,
l2) -> (p, p)`` used by the exact backend. Without it the exact backend differentiates twice.

**Identity.** ``task.identity`` keys every compile cache: equal configurations (the same linen
module configuration, NNX graph, functions, loss and measure) share compiled programs; two
tasks with different functions never do, whatever their ``name``. ``task.apply`` carries the
loss, the measure and the declared curvature (:class:`TaskApply`), so a function that only
receives ``apply`` still computes the task's loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from unlearn.objective import CROSS_ENTROPY, LOSS_MEASURE, Loss, Measure, as_loss, as_measure

Variables = dict[str, Any]
Spec = tuple[str, tuple[tuple[str, Any], ...]]
CURVATURES = ("softmax_regression", "binary_logistic")


class TaskApply:
    """An apply function that knows its task: ``loss``, ``measure``, declared ``curvature``.

    Hashed and compared by ``key`` (the task's identity plus how the function was derived),
    so it is a valid static ``jax.jit`` argument and equal tasks share compiled programs;
    ``key=None`` compares by object identity (e.g. a closure over arrays).
    """

    __slots__ = ("fn", "loss", "measure", "curvature", "key", "__weakref__")

    def __init__(self, fn: Callable, loss: Loss, measure: Measure, curvature, key: Hashable):
        self.fn, self.loss, self.measure, self.curvature, self.key = (fn, loss, measure,
                                                                      curvature, key)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    @property
    def __name__(self) -> str:
        return getattr(self.fn, "__name__", "apply")

    @property
    def __wrapped__(self) -> Callable:  # inspect.signature sees the function's own arguments
        return self.fn

    def derive(self, fn: Callable, tag: Hashable | None = None) -> TaskApply:
        """``fn`` with this function's loss, measure and curvature; keyed by (key, tag), or
        by identity when ``tag`` is None."""
        key = None if tag is None or self.key is None else (self.key, tag)
        return TaskApply(fn, self.loss, self.measure, self.curvature, key)

    def __hash__(self):
        return id(self) if self.key is None else hash(self.key)

    def __eq__(self, other):
        if self.key is None:
            return self is other
        return isinstance(other, TaskApply) and self.key == other.key

    def __repr__(self):
        return f"TaskApply({getattr(self.fn, '__name__', self.fn)!r}, loss={self.loss.name!r})"


class Task(NamedTuple):
    """A model as two pure functions plus its loss, measurement and declared facts.

    ``init(key, x) -> variables``; ``apply`` (a :class:`TaskApply`) returns outputs in eval
    mode and ``(outputs, new_state)`` in train mode. ``convex``: the L2-regularised objective
    is strictly convex in the params (declared). ``has_conv``: contains convolutions (picks
    the CPU epoch strategy). ``has_state``: carries state such as ``batch_stats``.
    ``stochastic``: train mode needs ``rng`` (dropout). ``spec``: for the package's own models,
    the hashable description ``models.from_spec`` rebuilds them from (``("", ())`` otherwise).
    ``source``: the hashable description of the functions (part of :attr:`identity`).
    """

    init: Callable[[jax.Array, jax.Array], Variables]
    apply: Callable[..., Any]
    name: str
    convex: bool = False
    has_conv: bool = False
    has_state: bool = False
    stochastic: bool = False
    spec: Spec = ("", ())
    source: Hashable = None

    @property
    def loss(self) -> Loss:
        return getattr(self.apply, "loss", CROSS_ENTROPY)

    @property
    def measure(self) -> Measure:
        return getattr(self.apply, "measure", LOSS_MEASURE)

    @property
    def curvature(self):
        return getattr(self.apply, "curvature", None)

    @property
    def identity(self) -> Hashable:
        """The compile-cache key: equal ⇔ the same functions, loss, measure and facts."""
        src = self.source if self.source is not None else ("fn", self.init, self.apply)
        return (src, self.loss, self.measure, _curvature_key(self.curvature), self.convex,
                self.has_state, self.stochastic)

    def with_loss(self, loss) -> Task:
        """The same model with another per-example loss (a new identity)."""
        return _rebuild(self, loss=as_loss(loss))

    def with_measure(self, measure) -> Task:
        """The same model with another influence measurement (a new identity)."""
        return _rebuild(self, measure=as_measure(measure))


def is_classifier(model, data=None) -> bool:
    """Whether ``model``'s loss reads class probabilities (cross-entropy: accuracy, softmax
    metrics and relabelling apply) and, if ``data`` is given, its targets are class labels.
    A bare ``apply`` without a declared loss counts as the package's cross-entropy."""
    loss = getattr(getattr(model, "apply", None), "loss", None)
    return (loss is None or loss.classes) and getattr(data, "targets", "classes") == "classes"


def _curvature_key(c):
    return c if c is None or isinstance(c, str) else ("fn", c)


def _check_curvature(curvature):
    if curvature is None or callable(curvature) or curvature in CURVATURES:
        return curvature
    raise ValueError(f"curvature={curvature!r} is unknown; choose one of {CURVATURES}, None, or "
                     "a function hessian(params, x, y, w, l2) -> (p, p).")


def _rebuild(task: Task, loss: Loss | None = None, measure: Measure | None = None) -> Task:
    raw = task.apply.fn if isinstance(task.apply, TaskApply) else task.apply
    return make_task(task.init, raw, task.name, source=task.source,
                     loss=loss or task.loss, measure=measure or task.measure,
                     curvature=task.curvature, convex=task.convex, has_conv=task.has_conv,
                     has_state=task.has_state, stochastic=task.stochastic, spec=task.spec)


def make_task(init: Callable, apply: Callable, name: str, *, source: Hashable = None,
              loss="cross_entropy", measure="loss", curvature=None, convex: bool = False,
              has_conv: bool = False, has_state: bool = False, stochastic: bool = False,
              spec: Spec = ("", ())) -> Task:
    """The :class:`Task` of ``init``/``apply`` (the package contract) and its declarations.
    ``source``: a hashable description of the functions (``None``: their identity)."""
    if not callable(init) or not callable(apply):
        raise TypeError("init and apply must be functions (see unlearn.task docstring).")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string; got {name!r}.")
    loss, measure = as_loss(loss), as_measure(measure)
    curvature = _check_curvature(curvature)
    src = source if source is not None else ("fn", init, apply)
    key = (src, loss, measure, _curvature_key(curvature), bool(convex), bool(has_state),
           bool(stochastic))
    fn = apply.fn if isinstance(apply, TaskApply) else apply
    return Task(init, TaskApply(fn, loss, measure, curvature, key), name, bool(convex),
                bool(has_conv), bool(has_state), bool(stochastic), spec, source)


def _takes(fn: Callable, arg: str) -> bool:
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def from_linen(module, *, loss="cross_entropy", measure="loss", curvature=None,
               convex: bool = False, has_conv: bool = False, has_state: bool = False,
               stochastic: bool = False, name: str | None = None, spec: Spec = ("", ()),
               rng_collection: str = "dropout") -> Task:
    """A :class:`Task` from a flax linen module ``module(x[, train])``.

    If ``__call__`` takes ``train``, it is passed (``False`` in eval mode); in train mode every
    collection other than ``params`` (e.g. ``batch_stats``) is mutable and returned as the new
    state, and ``rng`` (when given) is the ``rng_collection`` stream (dropout). Declare
    ``has_state=True`` for BatchNorm-style state, ``stochastic=True`` when train mode draws
    randomness. The identity is the module itself (linen modules are frozen dataclasses: equal
    configuration ⇒ equal identity) with the loss and declarations.
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise TypeError(f"from_linen needs a flax.linen.Module instance; got {type(module)!r} "
                        "(for an NNX module use from_nnx, for functions from_functions).")
    try:
        hash(module)
        source = ("linen", module)
    except TypeError:  # a module holding unhashable fields: identity only
        source = ("linen-id", id(module), module)
    name = name or type(module).__name__
    with_train = _takes(module.__call__, "train")

    def init(key: jax.Array, x: jax.Array) -> Variables:
        kw = {"train": False} if with_train else {}
        return dict(module.init(key, jnp.asarray(x[:1]), **kw))

    def apply(variables: Variables, x: jax.Array, *, train: bool = False,
              rng: jax.Array | None = None):
        kw = {"train": train} if with_train else {}
        if not train:
            return module.apply(variables, x, **kw)
        if stochastic and rng is None:
            raise ValueError(f"task {name!r} is stochastic: apply(..., train=True) needs "
                             "rng=<jax.random key>.")
        rngs = {} if rng is None else {rng_collection: rng}
        mutable = [c for c in variables if c != "params"]
        if mutable:
            out, new_state = module.apply(variables, x, rngs=rngs, mutable=mutable, **kw)
            return out, dict(new_state)
        return module.apply(variables, x, rngs=rngs, **kw), {}

    return make_task(init, apply, name, source=source, loss=loss, measure=measure,
                     curvature=curvature, convex=convex, has_conv=has_conv,
                     has_state=has_state, stochastic=stochastic, spec=spec)


def from_nnx(build: Callable, *, loss="cross_entropy", measure="loss", curvature=None,
             convex: bool = False, has_conv: bool = False, name: str | None = None) -> Task:
    """A :class:`Task` from a flax NNX module *constructor* ``build(rngs) -> nnx.Module``.

    ``init(key, x)`` builds the module with ``nnx.Rngs(key)`` (so every member of an ensemble
    draws its own initialisation from its key) and ``nnx.split``\\ s it into
    ``{"params": <nnx.Param leaves>, "nnx_state": <every other variable>}`` as plain dicts;
    ``apply`` ``nnx.merge``\\ s them back, in ``.eval()`` mode, or in ``.train()`` mode
    returning the updated non-parameter state (e.g. BatchNorm statistics). Modules that keep
    random streams (``nnx.Dropout(rngs=...)``) are refused: their keys would not follow the
    engine's per-step keys. The identity is ``build`` and the graph it makes.
    """
    from flax import nnx

    if not callable(build) or isinstance(build, nnx.Module):
        raise TypeError("from_nnx needs a constructor build(rngs) -> nnx.Module (e.g. "
                        "lambda rngs: MyModel(..., rngs=rngs)), not a module instance: the "
                        "engine initialises one module per ensemble member from its key.")
    probe = build(nnx.Rngs(0))
    graphdef, _, rest = nnx.split(probe, nnx.Param, ...)
    if any(isinstance(v, nnx.RngState) for _, v in nnx.to_flat_state(rest)):
        raise ValueError("from_nnx: the module keeps random streams (e.g. nnx.Dropout(rngs=...))"
                         "; train-mode randomness must come from the engine's keys. Build it "
                         "without stored rngs, or wrap it with from_functions.")
    has_state = bool(rest.to_pure_dict())
    name = name or type(probe).__name__

    def init(key: jax.Array, x: jax.Array) -> Variables:
        _, params, other = nnx.split(build(nnx.Rngs(key)), nnx.Param, ...)
        out = {"params": params.to_pure_dict()}
        other = other.to_pure_dict()
        if other:
            out["nnx_state"] = other
        return out

    def apply(variables: Variables, x: jax.Array, *, train: bool = False,
              rng: jax.Array | None = None):
        other = variables.get("nnx_state", {})
        module = nnx.merge(graphdef, variables["params"], other) if other else nnx.merge(
            graphdef, variables["params"])
        if not train:
            module.eval()
            return module(x)
        module.train()
        out = module(x)
        if not other:
            return out, {}
        _, _, new = nnx.split(module, nnx.Param, ...)
        return out, {"nnx_state": new.to_pure_dict()}

    return make_task(init, apply, name, source=("nnx", build, graphdef), loss=loss,
                     measure=measure, curvature=curvature, convex=convex, has_conv=has_conv,
                     has_state=has_state)


def from_functions(init: Callable, apply: Callable, *, loss="cross_entropy", measure="loss",
                   curvature=None, convex: bool = False, has_conv: bool = False,
                   has_state: bool = False, stochastic: bool = False,
                   name: str | None = None) -> Task:
    """A :class:`Task` from plain functions: ``init(key, x) -> {"params": ...}`` and
    ``apply(variables, x) -> outputs`` (eval mode). If ``apply`` takes ``train`` it must
    follow the package contract (``(outputs, new_state)`` when ``train=True``); otherwise the
    train mode is the eval mode with no state. The identity is the two function objects."""
    if not callable(init) or not callable(apply):
        raise TypeError("from_functions needs init(key, x) and apply(variables, x) functions.")
    if _takes(apply, "train"):
        fn = apply
    else:
        def fn(variables, x, *, train: bool = False, rng=None):
            out = apply(variables, x)
            return (out, {}) if train else out

    return make_task(init, fn, name or getattr(apply, "__name__", "task"),
                     source=("fn", init, apply), loss=loss, measure=measure,
                     curvature=curvature, convex=convex, has_conv=has_conv,
                     has_state=has_state, stochastic=stochastic)


__all__ = ["CURVATURES", "Task", "TaskApply", "from_functions", "from_linen", "from_nnx",
           "is_classifier", "make_task"]
