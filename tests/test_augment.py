"""Augmentation: a NumPy reference of crop-with-padding + flip, per-example keying that is
independent of the batch, and the drawn distribution (offsets uniform, flip rate 1/2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn import augment, data


def _images(n=16, h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, h, w, c)).astype(np.float32)


def _hashes(n, offset=0):
    return augment.hash32(data.stable_hash(np.array([str(i + offset) for i in range(n)])))


def _reference(x, dy, dx, fl, pad, mode, flip=True):
    """Independent NumPy transcription: np.pad, then slice, then mirror the W axis."""
    np_mode = "constant" if mode == "zero" else "reflect"
    out = []
    for img, oy, ox, f in zip(x, dy, dx, fl):
        p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode=np_mode)
        o = p[oy:oy + img.shape[0], ox:ox + img.shape[1]]
        out.append(o[:, ::-1] if (f and flip) else o)
    return np.stack(out)


@pytest.mark.parametrize("mode", ["zero", "reflect"])
@pytest.mark.parametrize("flip", [True, False])
def test_crop_and_flip_match_numpy_reference(mode, flip):
    x, h = _images(), _hashes(16)
    got = np.asarray(augment.augment(x, h, 3, 1, pad=4, flip=flip, mode=mode))
    dy, dx, fl = (np.asarray(a) for a in augment.draw(3, 1, h, pad=4))
    assert dy.min() >= 0 and dy.max() <= 8 and dx.min() >= 0 and dx.max() <= 8
    np.testing.assert_array_equal(got, _reference(x, dy, dx, fl, 4, mode, flip))


def test_pad_zero_is_identity_up_to_flip():
    x, h = _images(), _hashes(16)
    got = np.asarray(augment.augment(x, h, 0, 0, pad=0, flip=False))
    np.testing.assert_array_equal(got, x)


def test_grayscale_without_channel_axis():
    x, h = _images(c=1)[..., 0], _hashes(16)
    np.testing.assert_array_equal(augment.augment(x, h, 5, 2),
                                  np.asarray(augment.augment(x[..., None], h, 5, 2))[..., 0])


def test_deterministic_and_keyed_by_seed_epoch():
    x, h = _images(), _hashes(16)
    a = np.asarray(augment.augment(x, h, 7, 2))
    np.testing.assert_array_equal(a, augment.augment(x, h, 7, 2))
    np.testing.assert_array_equal(a, augment.augment(x, h, jax.random.key(7), 2))
    assert not np.array_equal(a, augment.augment(x, h, 7, 3))
    assert not np.array_equal(a, augment.augment(x, h, 8, 2))
    # jittable with a traced epoch and key: same numbers
    f = jax.jit(lambda x, h, k, e: augment.augment(x, h, k, e))
    np.testing.assert_array_equal(a, f(x, h, jax.random.key(7), jnp.int32(2)))


def test_independent_of_batch_composition_and_order():
    x, h = _images(32), _hashes(32)
    full = np.asarray(augment.augment(x, h, 11, 4))
    perm = np.random.default_rng(1).permutation(32)
    np.testing.assert_array_equal(augment.augment(x[perm], h[perm], 11, 4), full[perm])
    keep = np.sort(np.random.default_rng(2).choice(32, 9, replace=False))
    np.testing.assert_array_equal(augment.augment(x[keep], h[keep], 11, 4), full[keep])
    # another batch around the same example: the example's augmentation is unchanged
    other = np.concatenate([_images(5, seed=3), x[keep[:1]]])
    oh = np.concatenate([_hashes(5, offset=1000), h[keep[:1]]])
    np.testing.assert_array_equal(augment.augment(other, oh, 11, 4)[-1], full[keep[0]])


def test_offsets_uniform_and_flip_rate_half():
    n = 20000
    h = _hashes(n)
    dy, dx, fl = (np.asarray(a) for a in augment.draw(0, 0, h, pad=4))
    # flip ~ Bernoulli(1/2): 5 standard deviations of the mean of n draws
    assert abs(fl.mean() - 0.5) < 5 * np.sqrt(0.25 / n)
    for off in (dy, dx):
        counts = np.bincount(off, minlength=9)
        assert counts.shape == (9,)
        # each of the 9 offsets ~ Binomial(n, 1/9): 5 standard deviations
        sd = np.sqrt(n * (1 / 9) * (8 / 9))
        assert np.all(np.abs(counts - n / 9) < 5 * sd)
    # crop offsets and flips of different examples are not all equal across epochs
    dy1, _, fl1 = (np.asarray(a) for a in augment.draw(0, 1, h, pad=4))
    assert 0.05 < (dy1 == dy).mean() < 0.2  # ~1/9 agree by chance
    assert 0.45 < (fl1 == fl).mean() < 0.55


def test_bad_inputs_are_named():
    x, h = _images(4), _hashes(4)
    with pytest.raises(ValueError, match="id_hashes"):
        augment.augment(x, h[:3], 0, 0)
    with pytest.raises(ValueError, match="x must be images"):
        augment.augment(x.reshape(4, -1), h, 0, 0)
    with pytest.raises(ValueError, match="mode"):
        augment.augment(x, h, 0, 0, mode="wrap")
    with pytest.raises(ValueError, match="reflect"):
        augment.augment(x, h, 0, 0, pad=8, mode="reflect")
    with pytest.raises(TypeError, match="uint64"):
        augment.hash32(np.arange(4))
    with pytest.raises(TypeError, match="seed_or_key"):
        augment.augment(x, h, 1.5, 0)
