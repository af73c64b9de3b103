"""Caches that grow, shown on the views study's data: two teachers on the same stored views, and a grown cache.

    1. a second teacher: a small ResNet-18 (channels 32-256, output stride 8: a 4x4 feature map at 28 px, where
       the ViT teacher gives 7x7 tokens) trained supervised on the same 55,000 images as the study's ViT
       teacher, its checkpoint chosen on the same validation images; its frozen features against raw pixels
    2. its cache on exactly the ViT cache's stored views (`mdcache extract --views-of`): K=2, view seed 0
    3. three students, the views study's settings (64 epochs, seed 0): from the ViT cache alone (the views
       study's K=2 seed-0 student when it exists: the same command on the same cache), from the CNN cache
       alone, and from both (`mdtrain pretrain --cache VIT --cache CNN`: one head per teacher, the CNN's 4x4
       targets resampled to the student's 7x7 grid); k-NN, linear probe and finetune top-1 as in the study
    4. growth: the subset extracted at K=2 and grown to K=8, against a fresh K=8 extraction: every stored byte
       compared, then a student trained from each for --growth-epochs and its weights compared

    python pipelines/study/teachers.py --out runs/study --jobs 2   # after (or beside) run.py: its data, teacher
    python pipelines/study/teachers.py --quick --out runs/quick    # minutes: CI's form

Outputs in OUT/teachers/: results.json (paths relative to OUT), results.md; --write-doc copies them to
docs/study/teachers-*. Every step resumes like run.py's.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as study  # noqa: E402  (pipelines/study/run.py: the views study's stages)

PY = study.PY
CNN = "resnet18"
CNN_ARGS = ("output_stride=8", "channels=[32,64,128,256]")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """run.py's options (the same data, teacher, students and metrics), and this study's own."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--cnn-epochs", type=int, default=None, help="the CNN teacher's supervised epochs (8; --quick 1)")
    p.add_argument("--growth-epochs", type=int, default=None, help="epochs of the grown-vs-fresh students (2; "
                                                                     "--quick 1)")
    mine, rest = p.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):
        print(__doc__ + "\n  --cnn-epochs N, --growth-epochs N, and every option of run.py:\n")
    a = study.parse(rest)
    a.cnn_epochs = mine.cnn_epochs or (1 if a.quick else 8)  # a typed value wins over --quick's
    a.growth_epochs = mine.growth_epochs or (1 if a.quick else 2)
    return a


def cnn_flags() -> list[str]:
    return [x for kv in CNN_ARGS for x in ("--model-arg", kv)]


def train_cnn(s: study.Study, d: dict) -> str:
    """The second teacher: supervised on the ViT teacher's images and recipe (crops, smoothing, no mixup)."""
    a, tdir = s.a, os.path.join(s.out, "teachers", "cnn-teacher")
    if not os.path.exists(os.path.join(tdir, "done")):
        lo, hi = a.crop_scale.split(",")
        s.run(PY, "-m", "mdtrain", "finetune", "--model", CNN, *cnn_flags(), "--image-size", str(a.image_size),
              "--train", d["train"], "--val", d["val"], "--out", tdir, "--epochs", str(a.cnn_epochs),
              "--warmup-epochs", str(min(1, a.cnn_epochs - 1)), "--batch-size", "128", "--lr", "1e-3",
              "--layer-decay", "1.0", "--drop-path", "0.05", "--smoothing", "0.1", "--aa", "none", "--reprob", "0",
              "--mixup", "0", "--cutmix", "0", "--crop-scale", lo, hi, "--crop-pct", "1.0", "--color-jitter", "0",
              "--global-pool", "avg", "--workers", str(max(1, a.workers)), "--resume", "auto", log="cnn-teacher.log")
        open(os.path.join(tdir, "done"), "w").close()
    return os.path.join(tdir, "best.safetensors")


def cnn_anchors(s: study.Study, d: dict, weights: str) -> dict:
    def measure():
        ev = json.loads(s.run(PY, "-m", "mdtrain", "eval", "--weights", weights, "--val", d["test"],
                              "--workers", str(s.a.workers), log="cnn-teacher.log"))
        return {"test_top1": ev["top1"], **study.evaluate_backbone(s, weights, d, "cnn-teacher.log")}
    return s.cached_json(os.path.join(s.out, "teachers", "cnn-teacher", "anchors.json"), measure)


def vit_cache(s: study.Study, tweights: str, d: dict) -> str:
    """The ViT teacher's K=2 cache of view seed 0: the views study's own when it made one, else a new one."""
    made = os.path.join(s.out, "students", f"K2-{s.a.codec}", "seed0", "eval.json")
    if os.path.exists(made):
        with open(made) as f:
            return os.path.join(s.out, json.load(f)["cache"])
    return study.cache_for(s, 2, 0, tweights, d)


def cnn_cache(s: study.Study, weights: str, views_of: str) -> str:
    a = s.a
    return s.run(PY, "-m", "mdcache", "extract", "--teacher", f"timm:{CNN}", "--teacher-weights", weights,
                 "--views-of", views_of, "--views", "2", "--root", os.path.join(s.out, "caches"), "--codec", a.codec,
                 "--batch-size", "256", "--workers", str(a.workers), log="extract.log")


def heldout_loss(s: study.Study, sdir: str, teacher: list[str], d: dict, head: int = 0) -> float:
    """The loss of one head of the student (0: the first cache's teacher's) against that head's teacher, on
    fresh test crops."""
    a = s.a
    r = s.run(PY, "-m", "mdtrain", "distill-loss", "--ckpt", os.path.join(sdir, "last.ckpt"), *teacher,
              "--head", str(head), "--source", d["test"], *study.view_flags(a), "--seed", "10000",
              "--workers", str(a.workers), log="distill-loss.log", threads=1 if a.jobs > 1 else None)
    return json.loads(r)["loss"]


def cnn_head_loss(s: study.Study, name: str, cnn_teacher: list[str], d: dict) -> float:
    """Held-out loss of a two-cache student's CNN head (head 1) against the CNN teacher (SDIR/cnn-head.json)."""
    sdir = os.path.join(s.out, "teachers", "students", name)
    return s.cached_json(os.path.join(sdir, "cnn-head.json"),
                         lambda: {"loss": heldout_loss(s, sdir, cnn_teacher, d, head=1)})["loss"]


def student(s: study.Study, name: str, caches: list[str], weights: list[str], teacher: list[str] | None,
            d: dict) -> dict:
    """One seed-0 student from these caches and loss weights, with the views study's metrics (SDIR/eval.json).
    The held-out loss is the first head's, against `teacher` (None: not measured)."""
    sdir = os.path.join(s.out, "teachers", "students", name)

    def run_all():
        t0 = time.time()
        study.pretrain(s, sdir, 0, [*(x for c in caches for x in ("--cache", c)), "--cache-views", "2",
                                    *(x for w in weights for x in ("--teacher-weight", w))])
        out = {"seed": 0, "caches": [s.rel(c) for c in caches], "teacher_weights": weights,
               "heldout_loss": heldout_loss(s, sdir, teacher, d) if teacher else None,
               **study.evaluate_backbone(s, os.path.join(sdir, "student.safetensors"), d, "eval.log",
                                         1 if s.a.jobs > 1 else None),
               "finetune_top1": study.finetune(s, os.path.join(sdir, "finetune"),
                                               os.path.join(sdir, "student.safetensors"), 0, d)}
        out["seconds"] = round(time.time() - t0, 1)
        return out
    return s.cached_json(os.path.join(sdir, "eval.json"), run_all)


def vit_student(s: study.Study, cache: str, teacher: list[str], d: dict) -> dict:
    """The ViT-only arm: the views study's K=2 seed-0 student when it is done (same cache, same command)."""
    made = os.path.join(s.out, "students", f"K2-{s.a.codec}", "seed0", "eval.json")
    if os.path.exists(made):
        with open(made) as f:
            r = json.load(f)
        return {"seed": 0, "caches": [r["cache"]], "from": s.rel(os.path.dirname(made)),
                **{k: r[k] for k in ("heldout_loss", "knn_top1", "linprobe_top1", "finetune_top1", "seconds")}}
    return student(s, "vit", [cache], [], teacher, d)


# ----------------------------------------------------------------------------- growth

def stored(cache_url: str) -> tuple[str, int]:
    """sha256 over every stored array and view parameter, shard by shard and view by view; and the view count."""
    sys.path.insert(0, study.ROOT)
    from mdcache.store import open_cache

    c, h, n = open_cache(cache_url), hashlib.sha256(), 0
    for shard in sorted(c.commits):
        for v in range(c.views):
            keys, arrays, params = c.read_encoded(shard, v)
            h.update("\n".join(keys).encode())
            for name in sorted(arrays):
                h.update(name.encode() + arrays[name].tobytes())
            h.update(params.tobytes())
            n += len(keys)
    return h.hexdigest(), n


def weights_digest(path: str) -> str:
    sys.path.insert(0, study.ROOT)
    from safetensors.torch import load_file

    sd, h = load_file(path), hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode() + sd[k].numpy().tobytes())
    return h.hexdigest()


def growth(s: study.Study, tweights: str, d: dict) -> dict:
    """K=2 grown to K=8 against a fresh K=8 extraction (two roots: one identity, two caches)."""
    a, gdir = s.a, os.path.join(s.out, "teachers", "growth")

    def extract(root: str, k: int) -> str:
        return s.run(PY, "-m", "mdcache", "extract", *study.teacher_flags(a, tweights), "--source", d["subset"],
                     "--root", os.path.join(gdir, root), "--views", str(k), "--codec", a.codec, "--seed", "0",
                     *study.view_flags(a), "--batch-size", "256", "--workers", str(a.workers), log="growth.log")

    def step(name: str, root: str, k: int) -> tuple[str, float]:
        """One extraction and its wall time, kept apart: a resumed study does not time a reuse as the work."""
        def run_one():
            t0 = time.time()
            return {"url": s.rel(extract(root, k)), "seconds": round(time.time() - t0, 1)}
        r = s.cached_json(os.path.join(gdir, f"{name}.json"), run_one)
        return os.path.join(s.out, r["url"]), r["seconds"]

    def measure():
        small, t_small = step("extract-k2", "grown", 2)
        grown, t_grow = step("grow-to-k8", "grown", 8)
        fresh, t_fresh = step("fresh-k8", "fresh", 8)
        (g_hash, g_n), (f_hash, f_n) = stored(grown), stored(fresh)
        students, short = {}, copy.copy(s)
        short.a = argparse.Namespace(**{**vars(a), "epochs": a.growth_epochs,
                                        "warmup_epochs": min(a.warmup_epochs, a.growth_epochs - 1)})
        for name, cache in (("grown", grown), ("fresh", fresh)):
            sdir = os.path.join(gdir, "students", name)
            study.pretrain(short, sdir, 0, ["--cache", cache])
            students[name] = weights_digest(os.path.join(sdir, "student.safetensors"))
        return {"k2_cache": s.rel(small), "grown_cache": s.rel(grown), "fresh_cache": s.rel(fresh),
                "same_cache_grown": small == grown, "views_compared": g_n, "stored_sha256": {"grown": g_hash,
                                                                                           "fresh": f_hash},
                "identical_bytes": g_hash == f_hash and g_n == f_n, "student_epochs": a.growth_epochs,
                "student_sha256": students, "identical_students": students["grown"] == students["fresh"],
                "seconds": {"extract_k2": t_small, "grow_to_k8": t_grow, "fresh_k8": t_fresh}}
    return s.cached_json(os.path.join(gdir, "growth.json"), measure)


# ----------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    s = study.Study(a)
    t_start = time.time()
    d = study.make_data(s)
    tweights = study.train_teacher(s, d)
    vit_anchor = study.anchors(s, d, tweights)
    cweights = train_cnn(s, d)
    cnn_anchor = cnn_anchors(s, d, cweights)
    vcache = vit_cache(s, tweights, d)
    ccache = cnn_cache(s, cweights, vcache)
    vit_t = study.teacher_flags(a, tweights)
    jobs = [("vit", lambda: vit_student(s, vcache, vit_t, d)),
            # the CNN alone through the two-cache path with the ViT's loss weight 0: the ViT cache's 7x7 grid is
            # the student's (masks on it), the CNN's 4x4 targets resampled to it, the ViT head learns nothing
            ("cnn", lambda: student(s, "cnn", [vcache, ccache], ["0", "1"], None, d)),
            ("vit+cnn", lambda: student(s, "vit+cnn", [vcache, ccache], ["1", "1"], vit_t, d)),
            ("growth", lambda: growth(s, tweights, d))]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        done = dict(zip([n for n, _ in jobs], pool.map(lambda job: job[1](), jobs)))
    cnn_t = ["--teacher", f"timm:{CNN}", "--teacher-weights", cweights]
    for name in ("cnn", "vit+cnn"):
        done[name]["heldout_loss_cnn_head"] = cnn_head_loss(s, name, cnn_t, d)
    grid = json.load(open(os.path.join(s.out, "teachers", "students", "vit+cnn", "config.json")))
    results = {"config": {**vars(a), "out": ".", "data": s.rel(a.data) if a.data else None},
               "machine": study.machine(),
               "teachers": {"vit": {"weights": s.rel(tweights), **vit_anchor["teacher"]},
                            "cnn": {"weights": s.rel(cweights), "model": CNN, "model_args": list(CNN_ARGS),
                                    **cnn_anchor}},
               "raw_pixels": vit_anchor["raw_pixels"], "caches": {"vit": s.rel(vcache), "cnn": s.rel(ccache)},
               "students": {k: done[k] for k in ("vit", "cnn", "vit+cnn")},
               "two_teacher_run": grid.get("teachers"),
               "growth": done["growth"], "wall_seconds": round(time.time() - t_start, 1)}
    out = os.path.join(s.out, "teachers")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    if a.write_doc:
        import shutil

        dst = os.path.join(study.ROOT, "docs", "study")
        os.makedirs(dst, exist_ok=True)
        for name in ("results.json", "results.md"):
            shutil.copy(os.path.join(out, name), os.path.join(dst, f"teachers-{name}"))
        print(f"copied results.json, results.md to {dst}/teachers-*")


def markdown(r: dict) -> str:
    t, px = r["teachers"], r["raw_pixels"]
    rows = ["| | held-out loss: ViT head vs the ViT | CNN head vs the CNN | k-NN top-1 % | linear probe % | "
            "finetune top-1 % |", "|---|---|---|---|---|---|"]
    names = {"vit": "student of the ViT cache", "cnn": "student of the CNN cache",
             "vit+cnn": "student of both caches (two heads)"}
    for key, label in names.items():
        v = r["students"][key]
        loss = "-" if v.get("heldout_loss") is None else f"{v['heldout_loss']:.4f}"
        cnn = "-" if v.get("heldout_loss_cnn_head") is None else f"{v['heldout_loss_cnn_head']:.4f}"
        rows.append(f"| {label} | {loss} | {cnn} | {v['knn_top1']:.2f} | {v['linprobe_top1']:.2f} | "
                    f"{v['finetune_top1']:.2f} |")
    for key, label in (("vit", "ViT teacher"), ("cnn", "CNN teacher")):
        if "test_top1" in t[key]:
            rows.append(f"| {label} (frozen; {t[key]['test_top1']:.2f}% as a classifier) | - | - | "
                        f"{t[key]['knn_top1']:.2f} | {t[key]['linprobe_top1']:.2f} | - |")
    rows.append(f"| raw pixels | - | - | {px['knn_top1']:.2f} | {px['linprobe_top1']:.2f} | - |")
    g = r["growth"]
    rows += ["", f"Growth: a K=2 cache grown to K=8 ({'the same cache' if g['same_cache_grown'] else 'ANOTHER cache'}"
             f" grew) against a fresh K=8 extraction: {g['views_compared']} stored views compared, bytes "
             f"{'identical' if g['identical_bytes'] else 'DIFFERENT'}; students after {g['student_epochs']} "
             f"epoch(s) {'identical' if g['identical_students'] else 'DIFFERENT'} (weights sha256). Extraction "
             f"seconds: K=2 {g['seconds']['extract_k2']}, growing to K=8 {g['seconds']['grow_to_k8']}, fresh K=8 "
             f"{g['seconds']['fresh_k8']}."]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
