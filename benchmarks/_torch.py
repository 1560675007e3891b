"""PyTorch twins of ``unlearn.models`` (logreg, MLP, 2-d CNN) and the obvious PyTorch SISA
loop, for side-by-side timing rows. Optional: import only when ``torch`` is installed
(``pip install torch==2.13.0``, the ``torch`` extra)."""

from __future__ import annotations

import time

import numpy as np


def torch_model(spec, in_shape: tuple[int, ...]):
    """The ``torch.nn.Module`` with the architecture of ``models.from_spec(spec)`` for inputs of
    per-example shape ``in_shape`` (flat or HWC); same layer sizes, PyTorch's own init."""
    import torch.nn as nn

    name, items = spec
    kw = dict(items)
    k = kw["num_classes"]
    d = int(np.prod(in_shape))
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, k))
    if name == "mlp":
        layers, prev = [nn.Flatten()], d
        for h in kw["hidden"]:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        return nn.Sequential(*layers, nn.Linear(prev, k))
    if name == "cnn":
        if kw.get("dropout", 0.0) > 0:
            raise ValueError("the PyTorch twin of the CNN is built without dropout.")
        shape = kw["image_shape"] or in_shape
        if len(shape) == 2:
            shape = (*shape, 1)
        if len(shape) != 3:
            raise ValueError(f"the PyTorch CNN twin is 2-d only; got image shape {shape}.")
        h, w, c = shape
        layers = [_ToNCHW((h, w, c))]
        for f in kw["features"]:
            layers += [nn.Conv2d(c, f, 3, padding=1), nn.ReLU()]
            c = f
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        layers += [_FlattenHWC(), nn.Linear(h * w * c, kw["dense"]), nn.ReLU(),
                   nn.Linear(kw["dense"], k)]
        return nn.Sequential(*layers)
    raise ValueError(f"no PyTorch twin for model {name!r}.")


def _module_base():
    import torch.nn as nn

    return nn.Module


class _ToNCHW(_module_base()):
    def __init__(self, hwc):
        super().__init__()
        self.hwc = tuple(hwc)

    def forward(self, x):  # flat or (H, W[, C]) inputs -> NCHW
        return x.reshape(x.shape[0], *self.hwc).permute(0, 3, 1, 2)


class _FlattenHWC(_module_base()):
    def forward(self, x):  # flatten in flax's (H, W, C) order
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def sisa_loop(spec, x: np.ndarray, y: np.ndarray, idx: np.ndarray, w: np.ndarray, *,
              lr: float = 1e-3, threads: int = 2, seed: int = 0) -> dict:
    """Train one module per shard in a Python loop (each shard to the end in turn), Adam,
    weighted-mean cross-entropy over padded batches ``idx, w`` of shape ``(E, T, S, B)``.
    Returns wall seconds (after a one-step warm-up on a throwaway model) and the mean last
    loss."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(np.asarray(y)).long()
    idx_t, w_t = torch.from_numpy(idx).long(), torch.from_numpy(w.astype(np.float32))
    in_shape = tuple(x.shape[1:])

    def step(m, opt, i, wb):
        opt.zero_grad()
        ce = F.cross_entropy(m(xt[i]), yt[i], reduction="none")
        loss = (ce * wb).sum() / wb.sum().clamp(min=1.0)
        loss.backward()
        opt.step()
        return loss

    warm = torch_model(spec, in_shape)
    step(warm, torch.optim.Adam(warm.parameters(), lr), idx_t[0, 0, 0], w_t[0, 0, 0])
    epochs, steps, shards = idx.shape[:3]
    nets = [torch_model(spec, in_shape) for _ in range(shards)]
    last = []
    t0 = time.perf_counter()
    for s in range(shards):
        opt = torch.optim.Adam(nets[s].parameters(), lr)
        for e in range(epochs):
            for t in range(steps):
                loss = step(nets[s], opt, idx_t[e, t, s], w_t[e, t, s])
                if e == epochs - 1 and t == steps - 2:
                    last.append(loss.item())
    return {"seconds": time.perf_counter() - t0, "last_loss": float(np.mean(last)),
            "torch": torch.__version__}


def torch_transformer(spec):
    """The ``torch.nn.Module`` twin of ``models.transformer`` (``models.from_spec(spec)``):
    token + learned position embeddings, pre-LN blocks of causal multi-head attention with
    ``nn.Linear`` query/key/value/out projections and a tanh-GELU MLP, a final LayerNorm
    (eps 1e-6, flax's default) and tied (``h Eᵀ``) or untied (bias-free ``head``) logits.
    Every dense projection is an ``nn.Linear`` (what kronfluence tracks). Load the flax
    weights with :func:`load_flax_transformer`."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    name, items = spec
    if name != "transformer":
        raise ValueError(f"torch_transformer needs a transformer spec; got {name!r}.")
    kw = dict(items)
    vocab, width, depth, heads = kw["vocab"], kw["width"], kw["depth"], kw["heads"]
    max_len, ratio, tied = kw["max_len"], kw["mlp_ratio"], kw["tied"]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value, self.out = (nn.Linear(width, width)
                                                          for _ in range(4))

        def forward(self, h):
            n, t, _ = h.shape
            dh = width // heads
            q, k, v = (f(h).reshape(n, t, heads, dh).transpose(1, 2)
                       for f in (self.query, self.key, self.value))
            s = q @ k.transpose(-1, -2) * dh ** -0.5
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            s = s.masked_fill(~causal, torch.finfo(s.dtype).min)
            o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(n, t, width)
            return self.out(o)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_attn = nn.LayerNorm(width, eps=1e-6)
            self.attn = Attention()
            self.ln_mlp = nn.LayerNorm(width, eps=1e-6)
            self.mlp_in = nn.Linear(width, ratio * width)
            self.mlp_out = nn.Linear(ratio * width, width)

        def forward(self, h):
            h = h + self.attn(self.ln_attn(h))
            return h + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(h)), approximate="tanh"))

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.pos = nn.Embedding(max_len, width)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.ln_final = nn.LayerNorm(width, eps=1e-6)
            self.head = None if tied else nn.Linear(width, vocab, bias=False)

        def forward(self, x):
            t = x.shape[1]
            h = self.embed(x) + self.pos(torch.arange(t))[None]
            for b in self.blocks:
                h = b(h)
            h = self.ln_final(h)
            return h @ self.embed.weight.T if self.head is None else self.head(h)

    return Transformer()


def load_flax_transformer(net, params) -> None:
    """Copy flax transformer ``params`` (``{"params": ...}``) into :func:`torch_transformer`'s
    module ``net`` (float32): Dense kernels ``(in, out)`` become Linear weights ``(out, in)``."""
    import torch

    p = params["params"] if "params" in params else params

    def t(a):
        return torch.from_numpy(np.asarray(a, np.float32).copy())

    def dense(lin, d):
        lin.weight.data = t(np.asarray(d["kernel"]).T)
        if lin.bias is not None:
            lin.bias.data = t(d["bias"])

    def ln(mod, d):
        mod.weight.data, mod.bias.data = t(d["scale"]), t(d["bias"])

    net.embed.weight.data = t(p["embed"]["embedding"])
    net.pos.weight.data = t(p["pos"]["embedding"])
    for i, b in enumerate(net.blocks):
        d = p[f"block_{i}"]
        ln(b.ln_attn, d["ln_attn"])
        ln(b.ln_mlp, d["ln_mlp"])
        for n in ("query", "key", "value", "out"):
            dense(getattr(b.attn, n), d["attn"][n])
        dense(b.mlp_in, d["mlp_in"])
        dense(b.mlp_out, d["mlp_out"])
    ln(net.ln_final, p["ln_final"])
    if net.head is not None:
        dense(net.head, p["head"])
