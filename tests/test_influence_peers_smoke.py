"""Smoke test of ``benchmarks/influence_peers.py``: the quick softmax setting, our rows only.

Our CG and Nyström-PCG scores must agree with our dense Cholesky (``exact``) to Pearson >
0.999 (different code paths: closed-form Hessian + Cholesky vs matrix-free HVPs), and the
table renders one line per row. Slow (training + three cold/warm row pairs, ~1 min on 2
shared cores): ``pytest -m slow tests/test_influence_peers_smoke.py``.
"""

import numpy as np
import pytest

from benchmarks import influence_peers as bp


@pytest.mark.slow
def test_quick_softmax_our_rows(tmp_path):
    bp.prepare_inputs("softmax", True, tmp_path)
    d = bp._load(tmp_path)
    assert d["x"].shape == (1000, 784) and d["xt"].shape == (20, 784)
    rows = {b: bp.run_ours("softmax", b, d) for b in ("exact", "cg", "pcg")}
    ref = rows["exact"]["scores"]
    assert ref.shape == (20, 1000) and np.all(np.isfinite(ref))
    for b in ("cg", "pcg"):
        pear, spear = bp._agree(rows[b]["scores"], ref)
        assert pear > 0.999, (b, pear)
        assert spear > 0.99, (b, spear)
    assert rows["pcg"]["iterations"] < rows["cg"]["iterations"]
    results = {}
    for b, r in rows.items():
        r = dict(r, peak_mb=1.0, pearson=1.0, spearman=1.0, pearson_ggn=1.0, spearman_ggn=1.0)
        r.pop("scores")
        results[b] = r
    out = {"setting": "softmax", "results": results}
    text = bp.table(out)
    assert text.count("\n") == 1 + len(rows)
    assert "ours `pcg`" in text
