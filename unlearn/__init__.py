"""unlearn: machine unlearning in JAX.

Bring your own model as a :class:`~unlearn.task.Task` (``from_linen``, ``from_nnx``,
``from_functions``), then train it (:mod:`unlearn.train`), unlearn with a registered method
(:mod:`unlearn.methods`), explain it with influence functions (:mod:`unlearn.influence` with a
backend of :mod:`unlearn.inverse`), serve deletions exactly with SISA (:mod:`unlearn.sisa`) and
measure against retraining (:mod:`unlearn.evaluate`, :mod:`unlearn.mia`).
"""

from unlearn.task import Task, from_functions, from_linen, from_nnx

__all__ = ["Task", "from_functions", "from_linen", "from_nnx"]
