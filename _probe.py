import time, jax, numpy as np
from unlearn import data, models, train
from benchmarks._common import best_time
for dsname in ["digits", "mnist1d"]:
    ds = data.load(dsname).train
    for name, m in [("logreg", models.logreg(10)), ("mlp32", models.mlp(10, (32,))), ("mlp128", models.mlp(10, (128,))), ("mlp256x2", models.mlp(10, (256,256)))]:
        cfg = train.TrainConfig(epochs=1, batch_size=128)
        key = jax.random.key(0)
        t1 = best_time(lambda: train.fit(m, ds, cfg, key).params)
        t8 = best_time(lambda: train.train_grid(m, ds, cfg, key, lr=np.geomspace(1e-4, 1e-2, 8))[0])
        print(dsname, len(ds), name, f"{t1:.4f} {t8:.4f} {t8/t1:.2f}", flush=True)
