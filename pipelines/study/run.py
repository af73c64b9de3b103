"""Does a teacher cache preserve MaskDistill? K stored views against a fresh crop every epoch, where learning
is real and stored views are reused 8 to 64 times.

One command, real labelled images that install offline (Fashion-MNIST from Debian), every stage through the
project's own commands:

    1. data       Fashion-MNIST: the teacher trains on 55,000 training images, 5,000 others are the validation
                  set for every selection, students distil on a class-balanced 2,000-image subset of the 55,000
                  (also the finetune labels and the k-NN/probe memory); final numbers on the 10,000 test images
    2. teacher    a small ViT trained supervised (`mdtrain finetune`, checkpoint chosen on validation), then
                  used through the normal `--teacher timm:... --weights` path; checked against raw pixels
    3. students   `mdtrain pretrain`, the same architecture, schedule and view distribution in every arm:
                  online with `--fresh-crops` (the paper's recipe), cached with K in --ks (`mdcache extract
                  --views K --seed SEED`: each seed its own views); the random-init floor
    4. metrics    held-out masked-feature loss on fresh test crops; the same loss on the stored training crops
                  and on fresh crops of the same images (the overfitting signal); k-NN (k=20) and linear probe;
                  finetune top-1 against the same model finetuned from scratch for the same epochs
    5. report     seed-paired differences to the online arm with 95% intervals against a margin fixed before
                  the run, a verdict per arm, training curves, wall time per stage: results.json (paths
                  relative to --out), results.md, study.png, curves.png; --write-doc copies them to docs/study/

    python pipelines/study/run.py --jobs 2        # the study (hours on 2 CPU cores; resumable, stage by stage)
    python pipelines/study/run.py --quick         # minutes: CI's form, every stage on a few hundred images

Every size is an option. Each finished step leaves its outputs in --out and is skipped when the study is
re-run, so an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable

# A small ViT for 28 px images: 7x7 patches of 4 px, width 128, depth 4 (teacher and students alike).
SMALL_VIT = "vit_tiny_patch16_224"
SMALL_VIT_ARGS = ("img_size=28", "patch_size=4", "embed_dim=128", "depth=4", "num_heads=4")
MARGIN = 0.5  # points of top-1: a cached arm is equivalent to online if the 95% interval lies within +-MARGIN
TOP1 = ("knn_top1", "linprobe_top1", "finetune_top1")  # the verdict's metrics
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(df: int) -> float:
    """The two-sided 95% quantile of Student's t: tabulated to 30 degrees of freedom, then Cornish-Fisher's first
    terms (within 0.001 of the exact value from 31 on)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    a = p.parse_args(argv)
    if a.quick:  # small defaults; an option given on the command line keeps its value
        only_typed = parser()  # every default None: what is not None was typed
        only_typed.set_defaults(**{k: None for k in vars(a)})
        typed = {k for k, v in vars(only_typed.parse_args(argv)).items() if v is not None}
        quick = dict(train_size=1000, val_size=200, subset_size=200, test_size=200, teacher_epochs=1, epochs=2,
                     warmup_epochs=1, finetune_epochs=2, ks="1,2", seeds="0", batch_size=32)  # K=1, 2: one cache
        for key, value in quick.items():
            if key not in typed:
                setattr(a, key, value)
    return a


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study", help="where everything goes (resumable)")
    p.add_argument("--train-size", type=int, default=55000, help="the teacher's training images")
    p.add_argument("--val-size", type=int, default=5000, help="validation images (every selection)")
    p.add_argument("--subset-size", type=int, default=2000, help="the students' class-balanced subset")
    p.add_argument("--test-size", type=int, default=10000, help="test images (final numbers only)")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--data", default=None, help="shards to use instead of Fashion-MNIST: a folder with train-*, val-*, "
                                                "subset-* and test-*.tar (with .cls labels)")
    p.add_argument("--teacher", default=None, help="an existing teacher (clip-b16, open_clip:..., timm:...) instead of "
                                                   "training one; with --teacher-weights")
    p.add_argument("--teacher-weights", default=None)
    p.add_argument("--tap", default="final", help="teacher feature tap (final, ln_post, proj): one per study run")
    p.add_argument("--model", default=SMALL_VIT, help="timm model of teacher and students")
    p.add_argument("--model-args", default=",".join(SMALL_VIT_ARGS), help="timm model arguments KEY=VALUE,...")
    p.add_argument("--crop-scale", default="0.6,1.0", help="RandomResizedCrop scale of the teacher's training and of "
                                                           "every distillation view (the same distribution)")
    p.add_argument("--teacher-epochs", type=int, default=16)
    p.add_argument("--epochs", type=int, default=64, help="pretraining epochs of every student")
    p.add_argument("--warmup-epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="pretraining peak lr")
    p.add_argument("--ks", default="1,2,8", help="stored views per image of the cached arms")
    p.add_argument("--codec", default="int8")
    p.add_argument("--seeds", default="0,1,2", help="each seed: its own init, masks, order and views")
    p.add_argument("--finetune-epochs", type=int, default=30)
    p.add_argument("--jobs", type=int, default=1, help="students trained at once (one CPU thread each)")
    p.add_argument("--workers", type=int, default=0, help="loader workers per command (28 px images: 0 is fastest)")
    p.add_argument("--only-teacher", action="store_true", help="stop after training the teacher (the demo's)")
    p.add_argument("--quick", action="store_true", help="CI form: a few hundred images, short schedules, K=1,2, "
                                                        "one seed")
    p.add_argument("--write-doc", action="store_true", help="copy the outputs to docs/study/")
    p.add_argument("--report-only", action="store_true", help="write the report from finished steps only: stop, "
                                                              "naming it, at the first step that would run")
    return p


class Study:
    """The runner: logs, the resumable steps and the wall time of each stage."""

    def __init__(self, a: argparse.Namespace):
        self.a, self.out = a, os.path.abspath(a.out)
        self.logs = os.path.join(self.out, "logs")
        self.stage_seconds: dict[str, float] = {}
        self.lock = threading.Lock()
        os.makedirs(self.logs, exist_ok=True)

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.out)

    def run(self, *cmd: str, log: str, threads: int | None = None) -> str:
        """A project command, its output appended to a log; stdout's last line is returned."""
        if self.a.report_only:
            raise SystemExit(f"study: --report-only, and this step has not finished: {' '.join(cmd[2:])}")
        t0 = time.time()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        with self.lock, open(os.path.join(self.logs, log), "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}\n")
        if p.returncode != 0:
            raise SystemExit(f"study: command failed ({p.returncode}), see {self.logs}/{log}:\n{p.stderr[-3000:]}")
        with self.lock:
            print(f"  {time.time() - t0:5.0f}s  {' '.join(cmd[2:5])} ...", flush=True)
        return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""

    def timed(self, stage: str, fn, *args):
        t0 = time.time()
        out = fn(*args)
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.time() - t0
        return out

    def cached_json(self, path: str, fn) -> dict:
        """fn() once: its JSON is kept at `path`, so a resumed study does not measure twice."""
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        out = fn()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f)
        return out


def model_flags(a: argparse.Namespace, flag: str) -> list[str]:
    return [x for kv in a.model_args.split(",") if kv for x in (flag, kv)]


def teacher_flags(a: argparse.Namespace, tweights: str) -> list[str]:
    """The teacher as every command takes it: the study's own (a timm model of --model), or --teacher."""
    return ["--teacher", a.teacher or f"timm:{a.model}", "--teacher-weights", tweights, "--tap", a.tap]


def view_flags(a: argparse.Namespace) -> list[str]:
    lo, hi = a.crop_scale.split(",")
    return ["--image-size", str(a.image_size), "--crop-scale", lo, hi, "--color-jitter", "0"]


def shards(data: str, split: str) -> str:
    names = sorted(f for f in os.listdir(data) if f.startswith(f"{split}-") and f.endswith(".tar"))
    if not names:
        raise SystemExit(f"study: no {split}-*.tar shards in {data}")
    first, last = names[0][len(split) + 1:-4], names[-1][len(split) + 1:-4]
    return os.path.join(data, f"{split}-{{{first}..{last}}}.tar") if first != last else os.path.join(data, names[0])


# ----------------------------------------------------------------------------- stages

def make_data(s: Study) -> dict:
    a, data = s.a, s.a.data or os.path.join(s.out, "data")
    if not a.data and not os.path.exists(os.path.join(data, "classes.json")):
        s.run(PY, "pipelines/study/make_data.py", "--out", data, "--train-size", str(a.train_size), "--val-size",
              str(a.val_size), "--subset-size", str(a.subset_size), "--test-size", str(a.test_size),
              "--shard-size", str(max(100, a.train_size // 10)), log="data.log")
    return {split: shards(data, split) for split in ("train", "val", "subset", "test")}


def train_teacher(s: Study, d: dict) -> str:
    """The teacher: supervised from scratch on the training images, its checkpoint chosen on validation."""
    a, tdir = s.a, os.path.join(s.out, "teacher")
    if a.teacher:
        return a.teacher_weights
    weights = os.path.join(tdir, "best.safetensors")
    if not os.path.exists(os.path.join(tdir, "done")):
        lo, hi = a.crop_scale.split(",")
        s.run(PY, "-m", "mdtrain", "finetune", "--model", a.model, *model_flags(a, "--model-arg"),
              "--image-size", str(a.image_size), "--train", d["train"], "--val", d["val"], "--out", tdir,
              "--epochs", str(a.teacher_epochs), "--batch-size", "128", "--lr", "1e-3",
              "--layer-decay", "1.0", "--drop-path", "0.05", "--smoothing", "0.1", "--aa", "none", "--reprob", "0",
              "--mixup", "0", "--cutmix", "0", "--crop-scale", lo, hi, "--crop-pct", "1.0", "--color-jitter", "0",
              "--global-pool", "avg", "--workers", str(max(1, a.workers)), "--resume", "auto", log="teacher.log")
        open(os.path.join(tdir, "done"), "w").close()
    return weights


def evaluate_backbone(s: Study, weights: str, d: dict, log: str, threads: int | None = None) -> dict:
    """k-NN (k=20) and linear probe of frozen features: memory/probe training on the subset, test images queried."""
    a = s.a
    flags = ["--weights", weights, "--train", d["subset"], "--val", d["test"], "--crop-pct", "1.0",
             "--workers", str(a.workers)]
    knn = json.loads(s.run(PY, "-m", "mdtrain", "knn", *flags, "--k", "20", log=log, threads=threads))
    lp = json.loads(s.run(PY, "-m", "mdtrain", "linprobe", *flags, log=log, threads=threads))
    return {"knn_top1": knn["top1"], "linprobe_top1": lp["top1"]}


def anchors(s: Study, d: dict, tweights: str) -> dict:
    """The teacher's test top-1 (as a classifier, from its validation-chosen checkpoint), its frozen features,
    and raw pixels at the same crop (the whole 28x28 image) with the same k-NN and a linear probe."""
    def measure():
        if s.a.teacher:  # not a classifier of these classes: no top-1 or frozen features to report
            return {"teacher": {}, "raw_pixels": raw_pixel_baselines(d["subset"], d["test"])}
        ev = json.loads(s.run(PY, "-m", "mdtrain", "eval", "--weights", tweights, "--val", d["test"],
                              "--workers", str(s.a.workers), log="teacher.log"))
        teacher = {"test_top1": ev["top1"], **evaluate_backbone(s, tweights, d, "teacher.log")}
        return {"teacher": teacher, "raw_pixels": raw_pixel_baselines(d["subset"], d["test"])}
    return s.cached_json(os.path.join(s.out, "teacher", "anchors.json"), measure)


def cache_for(s: Study, k: int, seed: int, tweights: str, d: dict) -> str:
    """The K-view cache of the subset with this seed's views (one extraction per (K, seed))."""
    a = s.a
    return s.run(PY, "-m", "mdcache", "extract", *teacher_flags(a, tweights),
                 "--source", d["subset"], "--root", os.path.join(s.out, "caches"), "--views", str(k),
                 "--codec", a.codec, "--seed", str(seed), *view_flags(a), "--batch-size", "256",
                 "--workers", str(a.workers), log="extract.log", threads=1 if a.jobs > 1 else None)


def pretrain(s: Study, sdir: str, seed: int, source: list[str]) -> None:
    """One student; an interrupted one resumes from its checkpoint, a finished one (SDIR/done) is skipped."""
    a = s.a
    if os.path.exists(os.path.join(sdir, "done")):
        return
    s.run(PY, "-m", "mdtrain", "pretrain", *source, "--student", a.model, *model_flags(a, "--student-arg"),
          "--epochs", str(a.epochs), "--warmup-epochs", str(a.warmup_epochs), "--batch-size", str(a.batch_size),
          "--lr", str(a.lr), "--seed", str(seed), "--workers", str(a.workers), "--out", sdir, "--no-progress",
          "--log-every", "10", "--resume", "auto", log="pretrain.log", threads=1 if a.jobs > 1 else None)
    open(os.path.join(sdir, "done"), "w").close()


def check_settings(run_dir: str, want: dict, config_key: str | None) -> None:
    """A report must not relabel runs made with other settings: what RUN_DIR/config.json recorded is compared
    with what this invocation asks for (nothing to compare before the run has started, or when a killed run
    left it unreadable: the resumed run writes it again)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            ran = json.load(f)
        ran = ran[config_key] if config_key else ran
    except (OSError, ValueError, KeyError, TypeError):
        return
    got = {k: ran.get(k) for k in want}
    if got != want:
        raise SystemExit(f"study: {run_dir} ran with {got}, this invocation asks for {want}: use another --out, or "
                         "the options it ran with")


def check_student(s: Study, sdir: str, seed: int, k: int | None) -> None:
    a = s.a
    check_settings(sdir, {"epochs": a.epochs, "warmup_epochs": a.warmup_epochs, "batch_size": a.batch_size,
                             "lr": a.lr, "seed": seed}, "config")
    check_settings(os.path.join(sdir, "finetune"), {"epochs": a.finetune_epochs, "seed": seed}, None)
    if k and os.path.exists(os.path.join(sdir, "last.ckpt")):
        views = trained_views(sdir)
        if views != k:
            raise SystemExit(f"study: {sdir} trained on {views or 'an unknown number of'} stored views per image, "
                             f"not K={k}: use another --out")


def trained_views(sdir: str) -> int | None:
    """Stored views per image a cached student trained on: its checkpoint's K, or for students of older versions
    (no K recorded) the K of a format-1 cache, which cannot grow; None when unknown."""
    import torch

    sys.path.insert(0, ROOT)
    from mdcache.store import open_cache

    ckpt = torch.load(os.path.join(sdir, "last.ckpt"), map_location="cpu", weights_only=True)
    if ckpt.get("views"):
        return int(ckpt["views"])
    if ckpt["config"].get("cache_views"):
        return int(ckpt["config"]["cache_views"])
    cache = ckpt["config"].get("cache")
    c = open_cache(cache[0] if isinstance(cache, list) else cache)
    return c.views if c.format_version < 2 else None


def distill_loss(s: Study, sdir: str, tweights: str, source: list[str], seed: int) -> float:
    """The student's masked-feature loss against the teacher on `source` (fresh crops of shards, or a cache's
    stored views)."""
    a = s.a
    r = s.run(PY, "-m", "mdtrain", "distill-loss", "--ckpt", os.path.join(sdir, "last.ckpt"),
              *teacher_flags(a, tweights), *source, *view_flags(a), "--seed", str(seed),
              "--workers", str(a.workers), log="distill-loss.log", threads=1 if a.jobs > 1 else None)
    return json.loads(r)["loss"]


def finetune(s: Study, fdir: str, init: str | None, seed: int, d: dict) -> float:
    """Finetune on the subset's labels (checkpoint chosen on validation), then top-1 on the test images. The
    same recipe and epochs for a pretrained student and for scratch (scratch without layer decay)."""
    a = s.a

    def measure():
        lo, hi = a.crop_scale.split(",")
        s.run(PY, "-m", "mdtrain", "finetune", *(["--init", init] if init else []), "--model", a.model,
              *model_flags(a, "--model-arg"), "--image-size", str(a.image_size), "--train", d["subset"],
              "--val", d["val"], "--out", fdir, "--epochs", str(a.finetune_epochs), "--batch-size", "64",
              "--lr", "1e-3", "--layer-decay",
              "0.75" if init else "1.0", "--drop-path", "0.1", "--smoothing", "0.1", "--aa", "none", "--reprob",
              "0", "--mixup", "0", "--cutmix", "0", "--crop-scale", lo, hi, "--crop-pct", "1.0",
              "--color-jitter", "0", "--global-pool", "avg", "--seed", str(seed), "--workers", str(a.workers),
              "--log-every", "0", "--resume", "auto", log="finetune.log", threads=1 if a.jobs > 1 else None)
        ev = json.loads(s.run(PY, "-m", "mdtrain", "eval", "--weights", os.path.join(fdir, "best.safetensors"),
                              "--val", d["test"], "--workers", str(a.workers), log="finetune.log"))
        return {"finetune_top1": ev["top1"]}
    return s.cached_json(os.path.join(fdir, "result.json"), measure)["finetune_top1"]


def student_dir(s: Study, arm: str, seed: int) -> str:
    return os.path.join(s.out, "students", arm.replace("=", "").replace(" ", "-"), f"seed{seed}")


def student(s: Study, arm: str, k: int | None, seed: int, tweights: str, d: dict) -> dict:
    """Everything of one (arm, seed): its cache, its student, every metric. Kept in SDIR/eval.json."""
    a, sdir = s.a, student_dir(s, arm, seed)
    teacher = teacher_flags(a, tweights)

    def run_all():
        t0 = time.time()
        cache = s.timed("caches", cache_for, s, k, seed, tweights, d) if k else None
        if arm == "random-init":
            source = [*teacher, "--source", d["subset"], "--fresh-crops", *view_flags(a), "--stop-after", "0"]
        elif cache:  # its first K views: the caches of one seed are one cache that grew from the smallest K
            source = ["--cache", cache, "--cache-views", str(k)]
        else:
            source = [*teacher, "--source", d["subset"], "--fresh-crops", *view_flags(a)]
        s.timed("students", pretrain, s, sdir, seed, source)
        fresh_seed = 10_000 + seed  # crops no student trained on
        out = {"seed": seed, "cache": s.rel(cache) if cache else None, "views": k,
               "heldout_loss": s.timed("metrics", distill_loss, s, sdir, tweights, ["--source", d["test"]],
                                       fresh_seed),
               "train_fresh_loss": s.timed("metrics", distill_loss, s, sdir, tweights, ["--source", d["subset"]],
                                           fresh_seed),
               **s.timed("metrics", evaluate_backbone, s, os.path.join(sdir, "student.safetensors"), d, "eval.log",
                         1 if a.jobs > 1 else None)}
        if cache:  # the crops it trained on, all K of them, against the fp32 teacher
            out["train_stored_loss"] = s.timed("metrics", distill_loss, s, sdir, tweights,
                                               ["--cache", cache, "--cache-views", str(k)], seed)
        out["finetune_top1"] = s.timed("finetunes", finetune, s, os.path.join(sdir, "finetune"),
                                       os.path.join(sdir, "student.safetensors"), seed, d)
        out["seconds"] = round(time.time() - t0, 1)
        return out
    return s.cached_json(os.path.join(sdir, "eval.json"), run_all)


# ----------------------------------------------------------------------------- statistics

def summarize(runs: list[dict]) -> dict:
    import numpy as np

    out = {}
    for key in ("heldout_loss", "train_fresh_loss", "train_stored_loss", "knn_top1", "linprobe_top1",
                "finetune_top1"):
        vals = np.array([r[key] for r in runs if key in r], dtype=float)
        if len(vals):
            out[key] = {"n": len(vals), "mean": float(vals.mean()),
                        "std": float(vals.std(ddof=1)) if len(vals) > 1 else None,
                        "min": float(vals.min()), "max": float(vals.max())}
    return out


def paired(arm: list[dict], ref: list[dict], key: str, rule: str = "margin") -> dict:
    """arm - reference, seed by seed: the mean and 95% t-interval of the differences, and a verdict.

    rule "margin" (top-1 against online): equivalent when the interval lies within +-MARGIN, worse or better
    when it lies wholly outside, undecided otherwise. rule "sign" (pretrained against scratch, and losses):
    helps / hurts (top-1) or lower / higher (loss) when the interval excludes zero. Fewer than two pairs: no
    interval, no verdict."""
    import numpy as np

    by_seed = {r["seed"]: r[key] for r in ref if key in r}
    diffs = np.array([r[key] - by_seed[r["seed"]] for r in arm if r["seed"] in by_seed and key in r], dtype=float)
    n = len(diffs)
    out = {"key": key, "n": n, "diffs": diffs.tolist(), "mean": float(diffs.mean()) if n else None, "ci95": None,
           "half_width": None, "verdict": "no interval (fewer than 2 seeds)"}
    if n < 2:
        return out
    half = t_975(n - 1) * float(diffs.std(ddof=1)) / math.sqrt(n)
    lo, hi = out["mean"] - half, out["mean"] + half
    if key.endswith("loss"):
        verdict = "lower" if hi < 0 else "higher" if lo > 0 else "no difference detected"
    elif rule == "sign":
        verdict = "helps" if lo > 0 else "hurts" if hi < 0 else "undecided"
    elif -MARGIN <= lo and hi <= MARGIN:
        verdict = "equivalent"
    elif hi < -MARGIN or lo > MARGIN:
        verdict = "worse" if hi < -MARGIN else "better"
    else:
        verdict = "undecided"
    return {**out, "ci95": [lo, hi], "half_width": half, "verdict": verdict}


def arm_verdict(vs_online: dict) -> str:
    """The rule fixed before the run, for an arm: equivalent when k-NN, linear probe and finetune all are; worse
    when any is worse; better when one is better and none worse; undecided otherwise."""
    v = [vs_online[k]["verdict"] for k in TOP1 if k in vs_online]
    if len(v) < len(TOP1) or any(x.startswith("no interval") for x in v):
        return "no verdict (fewer than 2 seeds)"
    if "worse" in v:
        return "worse"
    return "equivalent" if set(v) == {"equivalent"} else "better" if "better" in v else "undecided"


def raw_pixel_baselines(train: str, test: str) -> dict:
    """k-NN (k=20, cosine, as mdtrain knn) and a linear probe (as mdtrain linprobe) on raw pixels of the whole
    28x28 image: what any learned feature must beat."""
    sys.path.insert(0, ROOT)
    from mdtrain.evaluate import knn_classify, train_probe

    xt, yt = load_pixels(train)
    xv, yv = load_pixels(test)
    mean = xt.mean(0)
    probe = train_probe(xt - mean, yt, 10, epochs=100, warmup_epochs=10, batch_size=256, lr=0.1, weight_decay=0.0,
                        seed=0)
    import torch

    with torch.no_grad():
        lp = float((probe(xv - mean).argmax(1) == yv).float().mean() * 100)
    return {"knn_top1": knn_classify(xt - mean, yt, xv - mean, yv, k=20)["top1"], "linprobe_top1": lp}


def load_pixels(spec: str):
    """Grayscale pixels [N, H*W] float32 and labels of a shard spec, decoded by the project's own reader."""
    import numpy as np
    import torch

    sys.path.insert(0, ROOT)
    from mdcache.sources import iter_samples, list_source
    from mdcache.views import decode_image

    xs, ys = [], []
    for shard in list_source(spec):
        for smp in iter_samples(shard):
            xs.append(np.asarray(decode_image(smp.data).convert("L"), dtype=np.float32).reshape(-1) / 255)
            ys.append(smp.label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available()}


# ----------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    s = Study(a)
    t_start = time.time()
    d = s.timed("data", make_data, s)
    tweights = s.timed("teacher", train_teacher, s, d)
    if a.only_teacher:
        print(tweights)
        return
    anchor = s.timed("teacher", anchors, s, d, tweights)
    ks, seeds = [int(k) for k in a.ks.split(",") if k], [int(x) for x in a.seeds.split(",")]
    arms = [("online-fresh", None), *((f"K={k} {a.codec}", k) for k in ks), ("random-init", None)]
    # seed by seed, each seed's scratch finetune with its arms: a study cut short has whole seeds, and the
    # scratch runs share the pool instead of running one after another at the end
    jobs = [(arm, k, seed) for seed in seeds for arm, k in [*arms, ("scratch", None)]]

    def one(arm: str, k: int | None, seed: int) -> dict:
        if arm != "scratch":
            return student(s, arm, k, seed, tweights, d)
        fdir = student_dir(s, "scratch", seed)
        return {"seed": seed, "finetune_top1": s.timed("finetunes", finetune, s, fdir, None, seed, d)}
    for arm, k, seed in jobs:  # every finished or started run checked now, not hours later in its turn
        if arm == "scratch":
            check_settings(student_dir(s, "scratch", seed),
                           {"epochs": a.finetune_epochs, "seed": seed}, None)
        else:
            check_student(s, student_dir(s, arm, seed), seed, k)
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        done = list(pool.map(lambda job: one(*job), jobs))
    runs: dict[str, list[dict]] = {}
    for (arm, _, _), r in zip(jobs, done):
        runs.setdefault(arm, []).append(r)
    scratch = runs.pop("scratch")
    config = {**vars(a), "out": ".", "data": s.rel(a.data) if a.data else None,  # no machine paths
              "teacher_weights": s.rel(a.teacher_weights) if a.teacher_weights else None}
    results = {"config": config, "machine": machine(), "code": code_version(), "margin_points": MARGIN,
               "data": {k: s.rel(v) for k, v in d.items()},
               "teacher": {"weights": s.rel(tweights), **anchor["teacher"]}, "raw_pixels": anchor["raw_pixels"],
               "arms": {}, "scratch": {"runs": scratch, **summarize(scratch)},
               "reuse_per_stored_view": {f"K={k}": a.epochs / k for k in ks}}
    for arm, k in arms:
        entry = {"k": k, "codec": a.codec if k else None, "runs": runs[arm], **summarize(runs[arm])}
        if arm != "online-fresh":
            ref = runs["online-fresh"] if arm != "random-init" else None
            entry["vs_online"] = {key: paired(runs[arm], ref, key) for key in
                                  (*TOP1, "heldout_loss")} if ref else {}
            if ref:
                entry["verdict"] = arm_verdict(entry["vs_online"])
        if k:  # the overfitting signal: its stored training crops against fresh crops of the same images
            entry["stored_minus_fresh_loss"] = paired([{"seed": r["seed"], "loss": r["train_stored_loss"]}
                                                       for r in runs[arm]],
                                                      [{"seed": r["seed"], "loss": r["train_fresh_loss"]}
                                                       for r in runs[arm]], "loss")
        entry["vs_scratch"] = paired(runs[arm], scratch, "finetune_top1", rule="sign")
        results["arms"][arm] = entry
    # compute time from each run's own log, whenever it ran and however often it was resumed: summed over runs,
    # measured while other jobs shared the cores
    results["train_seconds"] = train_seconds(s, arms, seeds)
    results["stage_seconds_this_invocation"] = {k: round(v, 1) for k, v in s.stage_seconds.items()}
    results["wall_seconds_this_invocation"] = round(time.time() - t_start, 1)
    results["curves"] = curves(s, arms, seeds)
    with open(os.path.join(s.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results)
    with open(os.path.join(s.out, "results.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(s.out, "study.png"))
    plot_curves(results, os.path.join(s.out, "curves.png"))
    print(table)
    if a.write_doc:
        write_doc(s)
    print(f"study report written in {results['wall_seconds_this_invocation'] / 60:.1f} min: {s.out}/results.json, "
          "study.png, curves.png")


def code_version() -> dict:
    """The commit that wrote the report (students may have been trained by earlier ones: their config.json
    records the versions of the packages they ran with)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        return {}
    return {"report_commit": rev, "report_tree_modified": dirty}


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def train_seconds(s: Study, arms: list, seeds: list[int]) -> dict:
    """Training compute per stage from the runs' metrics.jsonl: finetunes and the teacher log train_seconds per
    epoch; pretraining logs images/s every few steps (time = images between two rows / that rate)."""
    def pretrain_seconds(rows: list[dict]) -> float:
        out, step = 0.0, 0
        for r in rows:
            if r.get("images_per_s"):
                out += (r["step"] - step) * s.a.batch_size / r["images_per_s"]
            step = r.get("step", step)
        return out
    students, finetunes = 0.0, 0.0
    sdirs = [student_dir(s, name, seed) for name, _ in [*arms, ("scratch", None)] for seed in seeds]
    for sdir in sdirs:
        students += pretrain_seconds(_rows(os.path.join(sdir, "metrics.jsonl")))
        finetunes += sum(r.get("train_seconds", 0.0) for r in _rows(os.path.join(sdir, "finetune", "metrics.jsonl")))
        finetunes += sum(r.get("train_seconds", 0.0) for r in _rows(os.path.join(sdir, "metrics.jsonl"))
                         if "val_top1" in r)  # scratch: the finetune is the run itself
    teacher = sum(r.get("train_seconds", 0.0) for r in _rows(os.path.join(s.out, "teacher", "metrics.jsonl")))
    return {"teacher": round(teacher, 1), "students_pretraining": round(students, 1),
            "finetunes": round(finetunes, 1)}


def curves(s: Study, arms: list, seeds: list[int]) -> dict:
    """Pretraining loss per logged step, per arm and seed (from each student's metrics.jsonl)."""
    out = {}
    for arm, _ in arms:
        if arm == "random-init":
            continue
        for seed in seeds:
            rows = _rows(os.path.join(student_dir(s, arm, seed), "metrics.jsonl"))
            if rows:  # loss_mean: the mean since the previous logged step (one step's loss is noisy)
                out.setdefault(arm, {})[str(seed)] = [[r["epoch"], r.get("loss_mean", r["loss"])] for r in rows]
    return out


# ----------------------------------------------------------------------------- outputs

def fmt(m: dict | None, digits: int = 2) -> str:
    """mean ± SD over seeds (no SD from one seed)."""
    if not m:
        return "-"
    return f"{m['mean']:.{digits}f}" + (f" ± {m['std']:.{digits}f}" if m.get("std") is not None else "")


def ci(p: dict) -> str:
    """mean [95% interval] (n): verdict; the loss differences with 4 decimals."""
    if p["mean"] is None:
        return "-"
    d = 4 if p["key"].endswith("loss") else 2
    if p["ci95"] is None:
        return f"{p['mean']:+.{d}f} (n={p['n']}): {p['verdict']}"
    lo, hi = p["ci95"]
    return f"{p['mean']:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}] (n={p['n']}): {p['verdict']}"


def markdown(r: dict) -> str:
    seeds = max(len(v["runs"]) for v in r["arms"].values())
    rows = [f"Test split, mean ± SD over seeds ({seeds} per arm); losses are the masked-feature loss, lower is "
            "better.", "",
            "| arm | held-out loss | stored-crop loss | fresh-crop loss (train images) | k-NN top-1 % | "
            "linear probe % | finetune top-1 % |", "|---|---|---|---|---|---|---|"]
    for name, v in r["arms"].items():
        rows.append(f"| {name} | {fmt(v.get('heldout_loss'), 4)} | {fmt(v.get('train_stored_loss'), 4)} | "
                    f"{fmt(v.get('train_fresh_loss'), 4)} | {fmt(v.get('knn_top1'))} | {fmt(v.get('linprobe_top1'))} | "
                    f"{fmt(v.get('finetune_top1'))} |")
    rows.append(f"| from scratch (finetune only, no layer decay) | - | - | - | - | - | "
                f"{fmt(r['scratch'].get('finetune_top1'))} |")
    t, px = r["teacher"], r["raw_pixels"]
    if "test_top1" in t:
        rows.append(f"| teacher (frozen features; {t['test_top1']:.2f}% as a classifier) | - | - | - | "
                    f"{t['knn_top1']:.2f} | {t['linprobe_top1']:.2f} | - |")
    rows.append(f"| raw pixels (the same crop) | - | - | - | {px['knn_top1']:.2f} | {px['linprobe_top1']:.2f} | - |")
    rows += ["", f"Arm minus online-fresh, seed-paired: mean [95% t-interval] (n seeds): verdict. Top-1 in points "
             f"against the margin ±{r['margin_points']} fixed before the run; the loss against zero. The arm's "
             "verdict: equivalent when all three top-1 metrics are, worse when any is, better when one is and none is "
             "worse, undecided otherwise.", "",
             "| arm | k-NN | linear probe | finetune | held-out loss | verdict |", "|---|---|---|---|---|---|"]
    for name, v in r["arms"].items():
        if v.get("vs_online"):
            o = v["vs_online"]
            rows.append(f"| {name} | {ci(o['knn_top1'])} | {ci(o['linprobe_top1'])} | {ci(o['finetune_top1'])} | "
                        f"{ci(o['heldout_loss'])} | {v['verdict']} |")
    halves = {k: [v["vs_online"][k]["half_width"] for v in r["arms"].values()
                  if v.get("vs_online") and v["vs_online"][k]["half_width"] is not None] for k in TOP1}
    if all(halves.values()):
        rows += ["", "What these seeds can resolve: the intervals' half-widths are " + ", ".join(
            f"{min(h):.2f}-{max(h):.2f} points ({k.removesuffix('_top1').replace('linprobe', 'linear probe')})"
            for k, h in halves.items()) + f". An interval fits within ±{r['margin_points']} only when its "
            "half-width is below that: a wider one can only say undecided, whatever the mean."]
    rows += ["", "Stored training crops minus fresh crops of the same images (the overfitting signal), seed-paired:",
             "", "| arm | loss difference |", "|---|---|"]
    rows += [f"| {name} | {ci(v['stored_minus_fresh_loss'])} |" for name, v in r["arms"].items()
             if "stored_minus_fresh_loss" in v]
    rows += ["", "Finetune top-1, pretrained minus from scratch (the same epochs and labels, seed-paired; helps when "
             "the interval lies above zero). The random-init row finetunes with the pretrained students' layer decay "
             "(0.75), scratch without (1.0): that row measures the recipe, not pretraining.", "",
             "| arm | difference |", "|---|---|"]
    rows += [f"| {name} | {ci(v['vs_scratch'])} |" for name, v in r["arms"].items()]
    ts = r.get("train_seconds")
    if ts:
        rows += ["", "Training compute, from each run's own log (summed over runs; jobs shared 2 cores): teacher "
                 f"{ts['teacher'] / 60:.0f} min, students' pretraining {ts['students_pretraining'] / 3600:.1f} h, "
                 f"finetunes {ts['finetunes'] / 3600:.1f} h."]
    return "\n".join(rows) + "\n"


def plot(r: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("heldout_loss", "held-out masked-feature loss (random-init off the scale)"),
               ("knn_top1", "k-NN top-1 (%)"), ("linprobe_top1", "linear probe top-1 (%)"),
               ("finetune_top1", "finetune top-1 (%)"))
    names = list(r["arms"])
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    for ax, (key, title) in zip(axes, metrics):
        for i, name in enumerate(names):
            if key == "heldout_loss" and name == "random-init":  # 0.26, far off the arms' 0.10-0.11 scale
                continue
            runs = [x[key] for x in r["arms"][name]["runs"] if key in x]
            ax.scatter([i] * len(runs), runs, s=14, color="C0", alpha=0.6)
            if runs:
                ax.errorbar([i], [sum(runs) / len(runs)], yerr=[r["arms"][name][key]["std"] or 0.0], marker="o",
                            color="C1", capsize=4)
        if key == "finetune_top1":
            ax.axhline(r["scratch"]["finetune_top1"]["mean"], color="gray", ls=":", label="from scratch")
        if key in ("knn_top1", "linprobe_top1"):
            if key in r["teacher"]:
                ax.axhline(r["teacher"][key], color="C2", ls="-.", label="teacher")
            ax.axhline(r["raw_pixels"][key], color="gray", ls="--", label="raw pixels")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
        if key != "heldout_loss":
            ax.legend(fontsize=7)
    fig.suptitle("Fashion-MNIST test split: students per arm (dots: seeds; orange: mean and spread)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_curves(r: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    w = 10  # logged steps per point: one batch's loss is noisy
    for i, (arm, by_seed) in enumerate(r["curves"].items()):
        for j, rows in enumerate(by_seed.values()):
            ys = [y for _, y in rows]
            smooth = [sum(ys[max(0, n - w + 1):n + 1]) / len(ys[max(0, n - w + 1):n + 1]) for n in range(len(ys))]
            ax.plot([x for x, _ in rows], smooth, color=f"C{i}", lw=0.8, alpha=0.7, label=arm if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"masked-token loss (training; mean of {w} logged steps)")
    ax.set_title("pretraining loss per arm (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_doc(s: Study) -> None:
    import shutil

    dst = os.path.join(ROOT, "docs", "study")
    os.makedirs(dst, exist_ok=True)
    for name in ("results.json", "results.md", "study.png", "curves.png"):
        shutil.copy(os.path.join(s.out, name), os.path.join(dst, name))
    print(f"copied results.json, results.md, study.png, curves.png to {dst}")


if __name__ == "__main__":
    main()
