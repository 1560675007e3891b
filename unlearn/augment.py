"""Data augmentation keyed per example: random crop with padding and horizontal flip.

The standard CIFAR augmentation of the ResNet papers: pad 4 pixels on each side, take a random
H×W crop, flip left-right with probability 1/2. He et al. (2016, Sec. 4.2) and the CIFAR
ResNet-18 used in the unlearning literature (torchvision ``RandomCrop(32, padding=4)``, default
``padding_mode="constant"``) pad with **zeros** (``mode="zero"``, the default here); the
DAWNBench ResNet-9 (Page 2018, used by TRAK / KLOM) pads with **reflection**
(``mode="reflect"``, NumPy/PyTorch "reflect": the edge pixel is not repeated).

Exactness. Example i's crop offsets and flip in epoch e are drawn from the key
``fold_in(fold_in(key, e), h_i)`` where ``h_i`` is a 32-bit hash of the example's *id* —
nothing else. So an example's augmentation does not depend on which other examples are present,
on the batch it lands in or on its position, and ``forget(train(D), U) == train(D∖U)`` (SISA,
retrain) still holds with augmentation on. ``hash32(data.stable_hash(ids))`` gives the hashes.

Everything is pure ``jnp``, vmapped over the batch, and jittable (``epoch`` and the key may be
traced values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("zero", "reflect")


def hash32(id_hashes64: np.ndarray) -> np.ndarray:
    """Fold 64-bit id hashes (``data.stable_hash``) to the uint32 values :func:`augment` takes
    (high and low halves XOR-ed; JAX without x64 has no uint64)."""
    h = np.asarray(id_hashes64)
    if h.dtype != np.uint64:
        raise TypeError(f"id_hashes64 must be uint64 (data.stable_hash(ids)); got {h.dtype}.")
    return ((h >> np.uint64(32)) ^ (h & np.uint64(0xFFFFFFFF))).astype(np.uint32)


def _as_key(seed_or_key) -> jax.Array:
    if isinstance(seed_or_key, int | np.integer):
        return jax.random.key(int(seed_or_key))
    k = jnp.asarray(seed_or_key) if not isinstance(seed_or_key, jax.Array) else seed_or_key
    if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
        return k
    if k.dtype == jnp.uint32 and k.shape == (2,):
        return jax.random.wrap_key_data(k)
    raise TypeError(f"seed_or_key must be an int seed or a jax.random key; got {k.dtype} "
                    f"with shape {k.shape}.")


def example_keys(seed_or_key, epoch, id_hashes) -> jax.Array:
    """One key per example: ``fold_in(fold_in(key, epoch), h_i)``, shape ``(B,)``."""
    k = jax.random.fold_in(_as_key(seed_or_key), epoch)
    return jax.vmap(lambda h: jax.random.fold_in(k, h))(jnp.asarray(id_hashes, jnp.uint32))


def draw(seed_or_key, epoch, id_hashes, *, pad: int = 4) -> tuple[jax.Array, jax.Array,
                                                                  jax.Array]:
    """The augmentation parameters of each example: crop offsets ``dy, dx`` uniform on
    ``{0, …, 2·pad}`` (into the padded image) and ``flip`` ~ Bernoulli(1/2)."""
    keys = example_keys(seed_or_key, epoch, id_hashes)

    def one(k):
        kc, kf = jax.random.split(k)
        off = jax.random.randint(kc, (2,), 0, 2 * pad + 1)
        return off[0], off[1], jax.random.bernoulli(kf)

    return jax.vmap(one)(keys)


def _check(x, id_hashes, pad: int, mode: str) -> None:
    if x.ndim not in (3, 4):
        raise ValueError(f"x must be images (B, H, W) or (B, H, W, C); got shape {x.shape} "
                         f"(reshape flat inputs to images first).")
    if jnp.shape(id_hashes) != (x.shape[0],):
        raise ValueError(f"id_hashes must have shape ({x.shape[0]},), one per image; got "
                         f"{jnp.shape(id_hashes)}.")
    if not isinstance(pad, int | np.integer) or pad < 0:
        raise ValueError(f"pad must be a non-negative int; got {pad!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    if mode == "reflect" and pad >= min(x.shape[1:3]):
        raise ValueError(f"mode='reflect' needs pad < image size; got pad={pad} for "
                         f"{x.shape[1:3]} images.")


def augment(x: jax.Array, id_hashes, seed_or_key, epoch, *, pad: int = 4, flip: bool = True,
            mode: str = "zero") -> jax.Array:
    """Random crop with ``pad``-pixel padding and (if ``flip``) a random horizontal flip of
    each image of ``x`` (``(B, H, W[, C])``, NHWC), keyed by ``(seed_or_key, epoch, id hash)``.

    Output image i is ``P(x_i)[dy_i : dy_i + H, dx_i : dx_i + W]`` (``P`` pads ``pad`` pixels
    per side, zeros or reflection), then mirrored along W when ``flip_i``; see :func:`draw`.
    """
    x = jnp.asarray(x)
    _check(x, id_hashes, pad, mode)
    squeeze = x.ndim == 3
    if squeeze:
        x = x[..., None]
    _, h, w, c = x.shape
    dy, dx, fl = draw(seed_or_key, epoch, id_hashes, pad=pad)
    widths = ((pad, pad), (pad, pad), (0, 0))
    np_mode = "constant" if mode == "zero" else "reflect"

    def one(img, oy, ox, f):
        padded = jnp.pad(img, widths, mode=np_mode)
        out = jax.lax.dynamic_slice(padded, (oy, ox, 0), (h, w, c))
        if flip:
            out = jnp.where(f, out[:, ::-1], out)
        return out

    out = jax.vmap(one)(x, dy, dx, fl)
    return out[..., 0] if squeeze else out
