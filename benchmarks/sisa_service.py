"""The persistent SISA deletion service, measured through its command line (issue 10).

Command: ``python -m benchmarks.sisa_service [--before PATH] [--trials 20]``.

1. ``timing``: wall time of ``python -m unlearn.sisa status`` and of a one-id ``forget`` on an
   image-folder example (3 jersey classes × 30 JPEGs of 32×32 with names such as
   ``Away_image03.JPG``, ``Home image 05.JPG`` and a unicode name; the README's command: CNN,
   4 shards, 2 slices). Each command is a fresh process, as a user runs it. With ``--before
   PATH`` (a checkout of an older revision) the same commands run on that code in the same
   session, interleaved, so the ratio is side by side on the same (shared, noisy) machine.
2. ``concurrency``: ``--trials`` trials of two ``forget`` processes started together on one model
   directory (different ids, MLP on the same folder): both deletions applied, the directory
   loadable and ``verify`` exact.
3. ``purge``: after forgetting from a freshly trained model, the purge scan over every file of
   the directory (0 checkpoints trained on a forgotten id), and the disk footprint after 10
   requests; then the forgotten files are deleted and ``status`` / a repeated ``forget`` /
   ``verify`` are run; ``verify`` in float32 after 5 chained requests.

Writes its tables into ``benchmarks/RESULTS.md`` between ``<!-- sisa_service -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent


def jersey_folder(root: Path, per_class: int = 30, seed: int = 0, ext: str = "JPG") -> Path:
    """3 classes of synthetic jerseys; names like the README's, plus a space and a unicode
    name per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    kinds = {"Away": ((230, 230, 230), (200, 20, 20)), "Home": ((20, 40, 160), (240, 240, 240)),
             "Third": ((20, 20, 20), (240, 200, 0))}
    for c, (cname, (body, stripe)) in enumerate(kinds.items()):
        (root / cname).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((32, 32, 3)) + np.array(body)
            for k in range(int(rng.integers(0, 4)), 32, 8):
                if c == 0:
                    img[k: k + 3, 6:26] = stripe
                elif c == 1:
                    img[4:28, k: k + 3] = stripe
                else:
                    img[max(0, k - 4): k, max(0, k - 4): k] = stripe
            img += rng.normal(0, 20, img.shape)
            name = (f"{cname} image {i:02d}.{ext}" if i % 10 == 5 else
                    f"{cname}_émoji_ü{i:02d}.{ext}" if i % 10 == 9 else
                    f"{cname}_image{i:02d}.{ext}")
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / cname / name,
                                                                        quality=95)
    return root


def sh(code: Path, *args: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``python -m unlearn.sisa *args`` in checkout ``code``; (wall seconds, result)."""
    env = dict(os.environ, PYTHONPATH=str(code))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "unlearn.sisa", *args], cwd=code, env=env,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if check and r.returncode != 0:
        raise RuntimeError(f"{args} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return dt, r


def train_names(code: Path, spec: str) -> list[str]:
    """File names of the training split (the split every revision uses: seed 0, 25% test)."""
    env = dict(os.environ, PYTHONPATH=str(code))
    r = subprocess.run([sys.executable, "-c",
                        "import json,sys; from unlearn import data; "
                        f"print(json.dumps(data.load({spec!r}).train.ids.tolist()))"],
                       cwd=code, env=env, capture_output=True, text=True, check=True)
    return [i.split("/")[-1] for i in json.loads(r.stdout.strip().splitlines()[-1])]


def timing(codes: dict[str, Path], tmp: Path, repeats: int = 3) -> dict:
    """status and one-id forget wall times per code revision, interleaved."""
    spec = f"folder:{jersey_folder(tmp / 'jerseys')}"
    names = train_names(next(iter(codes.values())), spec)
    dirs = {}
    for label, code in codes.items():
        d = tmp / f"model_{label}"
        sh(code, "train", str(d), "--data", spec, "--model", "cnn", "--shards", "4",
           "--slices", "2")
        dirs[label] = d
    out = {k: {"status_s": [], "forget_s": [], "stderr_lines": 0} for k in codes}
    for rep in range(repeats):
        for label, code in codes.items():
            dt, r = sh(code, "status", str(dirs[label]))
            out[label]["status_s"].append(dt)
            out[label]["stderr_lines"] += len(r.stderr.splitlines())
        for label, code in codes.items():
            dt, r = sh(code, "forget", str(dirs[label]), "--ids", names[3 * rep])
            out[label]["forget_s"].append(dt)
            out[label]["stderr_lines"] += len(r.stderr.splitlines())
    for v in out.values():
        v["status_median_s"] = statistics.median(v["status_s"])
        v["forget_median_s"] = statistics.median(v["forget_s"])
    return out


def _du(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _train_mlp(tmp: Path, spec: str, name: str = "base") -> Path:
    d = tmp / name
    sh(HERE, "train", str(d), "--data", spec, "--model", "mlp", "--shards", "4", "--slices", "2",
       "--epochs", "5", "--batch-size", "8", "--lr", "0.003")
    return d


def concurrency(tmp: Path, trials: int) -> dict:
    """``trials`` × two concurrent ``forget`` processes (different ids) on a fresh copy."""
    import shutil

    from unlearn import sisa

    spec = f"folder:{jersey_folder(tmp / 'jerseys')}"
    base = _train_mlp(tmp, spec)
    lay = np.load(base / "layout.npz")
    ids, shard = lay["ids"].astype(str), lay["shard"]
    rng = np.random.default_rng(0)
    rows, t0 = [], time.perf_counter()
    for t in range(trials):
        d = tmp / f"trial{t}"
        shutil.copytree(base, d)
        s1, s2 = rng.choice(4, 2, replace=False)  # two different shards
        a, b = rng.choice(ids[shard == s1]), rng.choice(ids[shard == s2])
        env = dict(os.environ, PYTHONPATH=str(HERE))
        procs = [subprocess.Popen([sys.executable, "-m", "unlearn.sisa", "forget", str(d),
                                   "--ids", n.split("/")[-1]], cwd=HERE, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in (a, b)]
        outs = [p.communicate() for p in procs]
        row = {"rc": [p.returncode for p in procs], "stderr_clean": all(e == "" for _, e in outs)}
        try:
            led = sisa.read_ledger(d)
            row["both_applied"] = sorted(i for e in led for i in e["ids"]) == sorted([a, b])
            st = sisa.status(d)
            row["loadable"] = st["version"] == 2
            row["no_forgotten_in_ckpts"] = st["checkpoints_trained_on_forgotten_data"] == 0
            v = sisa.verify(d)
            row["verify_exact"] = bool(v["ok"] and v["max_abs_diff"] == 0.0)
        except Exception as e:  # a failed trial is counted, not fatal
            row["error"] = f"{type(e).__name__}: {e}"
        row["pass"] = (row["rc"] == [0, 0] and row.get("both_applied", False)
                       and row.get("loadable", False) and row.get("verify_exact", False)
                       and row.get("no_forgotten_in_ckpts", False))
        rows.append(row)
        shutil.rmtree(d)
    return {"trials": trials, "passed": sum(r["pass"] for r in rows),
            "stderr_clean": sum(r["stderr_clean"] for r in rows),
            "failures": [r for r in rows if not r["pass"]],
            "wall_s": time.perf_counter() - t0}


def purge(tmp: Path) -> dict:
    """Purge scan after one request on a fresh model; footprint after 10 requests; verify after
    5 and 10 chained requests (float32); then delete the forgotten files and ask again."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_sisa_store import purge_scan  # the suite's scan: one definition of "purged"

    from unlearn import sisa

    spec = f"folder:{jersey_folder(tmp / 'jerseys')}"
    d = _train_mlp(tmp, spec, "purge")
    out = {"fresh_bytes_files": _du(d)}
    lay = np.load(d / "layout.npz")
    ids, shard = lay["ids"].astype(str), lay["shard"]
    rng = np.random.default_rng(1)
    picks = [str(rng.choice(ids[shard == s])) for s in rng.integers(0, 4, 10)]
    picks = list(dict.fromkeys(picks))
    while len(picks) < 10:
        picks = list(dict.fromkeys([*picks, str(rng.choice(ids))]))
    sh(HERE, "forget", str(d), "--ids", picks[0].split("/")[-1])
    scan = purge_scan(d)
    out["after_1_request"] = {"checkpoints": scan["checkpoints"],
                              "trained_on_forgotten": len(scan["trained_on_forgotten"]),
                              "stray_files": len(scan["strays"]), "complete": scan["complete"]}
    for i in range(1, 10):
        sh(HERE, "forget", str(d), "--ids", picks[i].split("/")[-1])
        if i == 4:
            v = sisa.verify(d)
            out["verify_after_5"] = {k: v[k] for k in ("ok", "max_abs_diff", "units_checked")}
    v = sisa.verify(d)
    out["verify_after_10"] = {k: v[k] for k in ("ok", "max_abs_diff", "units_checked")}
    scan = purge_scan(d)
    out["after_10_requests"] = {"bytes_files": _du(d), "checkpoints": scan["checkpoints"],
                                "trained_on_forgotten": len(scan["trained_on_forgotten"]),
                                "stray_files": len(scan["strays"])}
    root = Path(spec[7:])
    for i in picks:
        (root / i).unlink()
    _, r = sh(HERE, "status", str(d))
    s = json.loads(r.stdout)
    out["after_deleting_files"] = {
        "status": {k: s[k] for k in ("version", "forgotten",
                                     "checkpoints_trained_on_forgotten_data")},
        "repeat_forget": json.loads(sh(HERE, "forget", str(d), "--ids",
                                       picks[3].split("/")[-1])[1].stdout)["already_forgotten"],
    }
    _, r = sh(HERE, "verify", str(d), check=False)
    v = json.loads(r.stdout)
    out["after_deleting_files"]["verify"] = {k: v[k] for k in ("ok", "max_abs_diff",
                                                              "units_checked",
                                                              "missing_retained")}
    return out


def write_results(res: dict) -> None:
    """The ``sisa_service`` section of benchmarks/RESULTS.md."""
    from benchmarks._common import write_section

    lines = ["## SISA deletion service (`python -m benchmarks.sisa_service`)", "",
             f"Machine: {res['machine']}; one run, commands as fresh processes.", ""]
    if "timing" in res:
        t = res["timing"]
        lines += ["Image-folder example (90 JPEGs 32×32, CNN, 4 shards × 2 slices), wall time "
                  "of each CLI command (median of 3, before/after interleaved):", "",
                  "| command | " + " | ".join(t) + " |", "|---|" + "---|" * len(t)]
        for k, name in (("status_median_s", "`status`"), ("forget_median_s",
                                                            "`forget` (one id)")):
            lines.append(f"| {name} | " + " | ".join(f"{v[k]:.2f} s" for v in t.values())
                         + " |")
        lines.append("")
    if "concurrency" in res:
        c = res["concurrency"]
        lines += [f"Two concurrent `forget` processes (different shards), {c['trials']} "
                  f"trials: **{c['passed']}/{c['trials']}** with both deletions in the ledger, "
                  "the directory loadable, no checkpoint trained on forgotten data and "
                  f"`verify` exact (max |Δθ| = 0); stderr empty in {c['stderr_clean']}/"
                  f"{c['trials']}.", ""]
    if "purge" in res:
        p = res["purge"]
        a1, a10, dl = p["after_1_request"], p["after_10_requests"], p["after_deleting_files"]
        lines += [f"Purge scan (every file of the directory; each checkpoint restored with orbax "
                  "and compared with training from scratch without the forgotten ids) after one "
                  f"request on a fresh model: {a1['checkpoints']} checkpoints, "
                  f"**{a1['trained_on_forgotten']} trained on a forgotten example**, "
                  f"{a1['stray_files']} stray files. After 10 requests: "
                  f"{a10['trained_on_forgotten']} trained on forgotten data; footprint "
                  f"{a10['bytes_files'][0] / 1e6:.2f} MB in {a10['bytes_files'][1]} files "
                  f"(fresh: {p['fresh_bytes_files'][0] / 1e6:.2f} MB — one version is kept).",
                  "",
                  f"`verify` (float32) after 5 chained requests: ok={p['verify_after_5']['ok']}, "
                  f"max |Δθ| = {p['verify_after_5']['max_abs_diff']}; after 10: "
                  f"max |Δθ| = {p['verify_after_10']['max_abs_diff']}.", "",
                  "After deleting the 10 forgotten files: `status` reports "
                  f"{dl['status']['forgotten']} forgotten and "
                  f"{dl['status']['checkpoints_trained_on_forgotten_data']} checkpoints trained "
                  f"on them; a repeated `forget` answers {dl['repeat_forget']}; `verify` ok="
                  f"{dl['verify']['ok']} with {dl['verify']['units_checked']} checkpoints "
                  f"checked, max |Δθ| = {dl['verify']['max_abs_diff']}, missing retained "
                  f"examples {dl['verify']['missing_retained']}.", ""]
    write_section("sisa_service", "\n".join(lines))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, help="checkout of the older revision to compare")
    ap.add_argument("--only", choices=["timing", "concurrency", "purge"], nargs="*")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    a = ap.parse_args(argv)
    only = set(a.only or ["timing", "concurrency", "purge"])
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} CPU cores (shared, load {os.getloadavg()[0]:.1f})"}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "purge" in only:
            res["purge"] = purge(tmp / "purge")
            print(json.dumps(res["purge"], indent=1), flush=True)
        if "concurrency" in only:
            res["concurrency"] = concurrency(tmp / "conc", a.trials)
            print(json.dumps(res["concurrency"], indent=1), flush=True)
        if "timing" in only:
            codes = {"after": HERE}
            if a.before:
                codes = {"before": a.before.resolve(), "after": HERE}
            res["timing"] = timing(codes, tmp / "timing")
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    if a.write:
        write_results(res)
    return res


if __name__ == "__main__":
    main()
