"""The papers' metrics against independent computations: hand-made cases, scipy, a literal
transcription of the KLOM authors' estimator, and a hand-run relearning loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from unlearn import data, metrics, mia, models, train


def test_ua_ra_ta_and_avg_gap_hand_made():
    ds = data.make(np.eye(4, dtype=np.float32), [0, 1, 2, 3], num_classes=4)
    logits = lambda x: x * np.array([1, 1, -1, 1])  # noqa: E731  (class 2 misclassified)
    out = metrics.ua_ra_ta(logits, ds.subset([0, 1]), ds.subset([2, 3]), ds.subset([0, 2]))
    assert out == {"UA": 50.0, "RA": 100.0, "TA": 50.0}
    row = {"UA": 10.0, "RA": 95.0, "TA": 90.0, "MIA-efficacy": 20.0}
    ref = {"UA": 12.0, "RA": 99.0, "TA": 91.0, "MIA-efficacy": 30.0}
    assert metrics.avg_gap(row, ref) == pytest.approx((2 + 4 + 1 + 10) / 4)
    with pytest.raises(ValueError, match="MIA-efficacy"):
        metrics.avg_gap({"UA": 1, "RA": 1, "TA": 1}, ref)


def test_margins_match_log_odds():
    p = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    y = np.array([2, 0])
    np.testing.assert_allclose(metrics.margins(np.log(p), y),
                               np.log(p[[0, 1], y] / (1 - p[[0, 1], y])), rtol=1e-12)
    z = np.log(np.stack([p, p[::-1]]))  # (models, n, K) → (models, n)
    assert metrics.margins(z, y).shape == (2, 2)


def _literal_binned_kl(p_arr, q_arr, bin_count=20, eps=1e-5):
    # The KLOM authors' estimator, transcribed literally (clip, shared range, digitize,
    # per-bin counting, eps floor on q where p > 0, scipy.stats.entropy).
    p_arr, q_arr = np.clip(p_arr, -100, 100), np.clip(q_arr, -100, 100)
    start, end = min(p_arr.min(), q_arr.min()), max(p_arr.max(), q_arr.max())
    if start >= end:
        end = start + 1
    bins = np.linspace(start, end, bin_count + 1)
    pi, qi = np.digitize(p_arr, bins), np.digitize(q_arr, bins)
    pc = np.array([np.sum(pi == i) for i in range(1, bin_count + 1)])
    qc = np.array([np.sum(qi == i) for i in range(1, bin_count + 1)])
    pp = pc / pc.sum() if pc.sum() > 0 else np.zeros(bin_count)
    qp = qc / qc.sum() if qc.sum() > 0 else np.zeros(bin_count)
    return stats.entropy(pk=pp, qk=np.where(pp > 0, np.maximum(qp, eps), qp))


def test_klom_matches_literal_estimator():
    rng = np.random.default_rng(0)
    u = np.c_[rng.normal(0, 1, 100), rng.normal(3, 1, 100), np.full(100, 2.0),
              rng.normal(0, 300, 100), rng.integers(0, 3, 100).astype(float),
              np.full(100, 9.0)]
    o = np.c_[rng.normal(0, 1, 100), rng.normal(0, 1, 100), np.full(100, 2.0),
              rng.normal(0, 1, 100), rng.integers(0, 3, 100).astype(float),
              rng.normal(0, 1, 100)]
    k = metrics.klom(u, o)
    ref = [_literal_binned_kl(u[:, i], o[:, i]) for i in range(u.shape[1])]
    np.testing.assert_allclose(k, ref, rtol=1e-12, atol=1e-15)
    assert k[1] > 5 * k[0]  # a shifted ensemble is far from the oracle
    assert k[2] == 0.0  # identical constants
    assert np.isnan(k[5])  # all unlearned mass at the pooled maximum: NaN in both


def test_binned_kl_hand_computed():
    # 4 bins on the pooled range [0, 4]: edges 0, 1, 2, 3, 4. p = 0, 1, 2, 3 puts 1/4 in each
    # bin; q = 0, 0, 1, 4 puts 2/3 in bin 1 and 1/3 in bin 2, and 4 (the pooled maximum) in no
    # bin. q is floored to ε = 1e-5 in bins 3, 4 (where p > 0) and renormalised by 1 + 2ε.
    eps = 1e-5
    q_tilde = np.array([2 / 3, 1 / 3, eps, eps]) / (1 + 2 * eps)
    hand = np.sum(0.25 * np.log(0.25 / q_tilde))
    got = metrics.binned_kl(np.array([0.0, 1, 2, 3]), np.array([0.0, 0, 1, 4]), bins=4)
    assert got == pytest.approx(hand, rel=1e-12)
    assert got == pytest.approx(stats.entropy([1, 1, 1, 1], [2 / 3, 1 / 3, eps, eps]), rel=1e-12)
    # The direction: KL(p ‖ q), not KL(q ‖ p) (bin 3, 4 have no q mass: the reverse is small).
    rev = metrics.binned_kl(np.array([0.0, 0, 1, 4]), np.array([0.0, 1, 2, 3]), bins=4)
    assert rev == pytest.approx(stats.entropy([2, 1, 0, 0], [1, 1, 1, 1]), rel=1e-12)
    assert got > 5 * rev


def test_binned_kl_zero_mass_is_nan_and_counted():
    # Eight identical unlearned models whose margin (5) is above every oracle margin: every
    # unlearned sample equals the pooled maximum and falls outside the 20 bins. The authors'
    # code returns NaN (scipy normalises an all-zero p); so must we, not the 0 we used to.
    oracle = np.linspace(0.0, 3.0, 8)
    above = np.full(8, 5.0)
    assert np.isnan(metrics.binned_kl(above, oracle))
    assert np.isnan(_literal_binned_kl(above, oracle))
    # The mirror case (every oracle sample at the pooled maximum) is as undefined; the authors'
    # code gives ~0 there (the ε floor renormalised puts all of q on p's bins); we give NaN.
    below = np.full(8, -1.0)
    assert _literal_binned_kl(below, np.full(8, 5.0)) < 1e-12
    assert np.isnan(metrics.binned_kl(below, np.full(8, 5.0)))
    rng = np.random.default_rng(3)
    u = np.c_[rng.normal(0, 1, 8), above, rng.normal(1, 1, 8), below]
    o = np.c_[rng.normal(0, 1, 8), oracle, rng.normal(0, 1, 8), np.full(8, 5.0)]
    k = metrics.klom(u, o)
    assert np.isnan(k[[1, 3]]).all() and np.isfinite(k[[0, 2]]).all()
    s = metrics.klom_summary(k)
    assert s["klom_undefined"] == 2
    assert s["klom_mean"] == pytest.approx((k[0] + k[2]) / 2, rel=1e-12)
    assert s["klom_p95"] == pytest.approx(np.percentile(k[[0, 2]], 95), rel=1e-12)
    assert np.isnan(metrics.klom_summary(k[[1, 3]])["klom_mean"])


def test_mia_features_match_definitions():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    y = np.array([0, 0])
    f = mia.mia_features(p, y)
    np.testing.assert_allclose(f["entropy"][:, 0], stats.entropy(p, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(f["correctness"][:, 0], [1, 0])
    np.testing.assert_array_equal(f["confidence"][:, 0], [0.7, 0.1])
    # Song & Mittal Eq. 4 by hand for row 1 (y = 0, p_y = 0.1):
    m = -(0.9 * np.log(0.1)) - (0.1 * np.log(0.9) + 0.8 * np.log(0.2))
    assert f["m_entropy"][1, 0] == pytest.approx(m, rel=1e-12)


def test_mia_efficacy_on_hand_made_outputs():
    # Members are confidently right, non-members uniformly unsure. A forget set that looks like
    # members is called member (efficacy ≈ 0); one that looks like non-members ≈ 100.
    rng = np.random.default_rng(1)
    k, n = 4, 200

    def logits(conf, m):
        z = np.zeros((m, k))
        z[:, 0] = conf + rng.normal(0, 0.1, m)
        return z

    y = np.zeros(n, int)
    args = (logits(8, n), y, logits(0.5, n), y)
    like_members = mia.mia_efficacy(*args, logits(8, 50), y[:50])
    like_test = mia.mia_efficacy(*args, logits(0.5, 50), y[:50])
    assert like_members["MIA-efficacy"] <= 5 and like_test["MIA-efficacy"] >= 95
    assert set(like_test) >= {f"MIA-{f}" for f in mia.MIA_FEATURES}


def test_relearn_time_counts_steps():
    s = data.load("digits")
    tr = s.train.subset(np.arange(300))
    m = models.mlp(10, (16,))
    cfg = train.TrainConfig(epochs=30, batch_size=32, lr=3e-3)
    full = train.fit(m, tr, cfg, jax.random.key(0)).params
    forget = tr.subset(np.arange(32))
    target = float(np.mean(np.argmax(np.asarray(m.apply(full, forget.x)), -1) == forget.y))
    assert metrics.relearn_time(m.apply, full, forget, target, lr=1e-3) == 0
    fresh = train.init_params(m, tr, jax.random.key(1))
    steps = metrics.relearn_time(m.apply, fresh, forget, target, lr=1e-3, batch_size=32)
    # By hand: the same Adam steps on the whole 32-example forget set, counted until the
    # accuracy reaches the target.
    opt = optax.adam(1e-3)

    def loss(p):
        z = m.apply(p, forget.x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), forget.y[:, None], 1))

    p, st, count = fresh, opt.init(fresh), 0
    while np.mean(np.argmax(np.asarray(m.apply(p, forget.x)), -1) == forget.y) < target:
        upd, st = opt.update(jax.grad(loss)(p), st, p)
        p = optax.apply_updates(p, upd)
        count += 1
    assert 0 < steps == count
