"""Bring your own model: a flax linen module of yours as an :class:`unlearn.task.Task`.

``make_model`` is the factory the README's "Bring your own model" section uses both in Python
and on the SISA command line (``--model examples.byo_model:make_model --model-kwargs
'{"width": 16}'``): it is called as ``make_model(**model_kwargs)`` and returns a Task that every
layer of the library accepts (training, influence, every method, SISA, evaluation).
"""

from __future__ import annotations

import flax.linen as nn

from unlearn import task


class Net(nn.Module):
    """Dense → LayerNorm → GELU → Dense: a model the package's registry does not have."""

    width: int = 16
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.gelu(nn.LayerNorm()(nn.Dense(self.width)(x)))
        return nn.Dense(self.classes)(x)


def make_model(width: int = 16, classes: int = 10) -> task.Task:
    """The Task of :class:`Net`: logits trained with per-example cross-entropy; influence
    measures the test loss. Not convex, so methods that need a strictly convex objective
    (``certified``) refuse it with a ValueError."""
    return task.from_linen(Net(width=width, classes=classes), loss="cross_entropy",
                           name="byo_net")
