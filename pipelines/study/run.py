"""What does a teacher cache cost? K stored views (and lossy codecs) against a fresh crop every epoch.

One command, real labelled images that install offline (Fashion-MNIST from Debian), every stage through
the project's own commands:

    1. data      shuffled WebDataset shards of the train and test splits
    2. teacher   a small ViT trained supervised on the train split (`mdtrain finetune` from scratch),
                 used through the normal `--teacher timm:...` + `--weights` path
    3. caches    `mdcache extract` with K views per image, for every K and codec of the study
    4. students  `mdtrain pretrain`, same architecture, steps, seeds and schedule in every arm:
                 online with `--fresh-crops` (the paper's recipe), cached with K in KS, each codec at
                 K=8, equal-storage pairs; random init is the floor, the teacher the ceiling
    5. metrics   on the TEST split: held-out masked-feature loss on fresh crops (`mdtrain distill-loss`),
                 k-NN top-1 (`mdtrain knn`), linear-probe top-1 (`mdtrain linprobe`); mean and spread
                 over seeds
    6. outputs   runs/study/results.json, runs/study/study.png, and a markdown table (docs/study.md is
                 written from it with --write-doc)

    python pipelines/study/run.py                 # the full study (about an hour on a 2-core CPU)
    python pipelines/study/run.py --quick         # minutes: a few hundred images, one epoch, two arms
    python pipelines/study/run.py --taps final,ln_post,proj --teacher clip-b16 --weights ViT-B-16.safetensors \
        --data /data/imagenet100 ...            # the same study on other data and teachers (docs/study.md)

Every size is an option. Each finished stage leaves its outputs in --out and is skipped when the study is
re-run, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable

# A small ViT for 28 px images: 7x7 patches of 4 px, width 128, depth 4 (teacher and students alike).
SMALL_VIT = "vit_tiny_patch16_224"
SMALL_VIT_ARGS = ("img_size=28", "patch_size=4", "embed_dim=128", "depth=4", "num_heads=4")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study", help="where everything goes (resumable)")
    p.add_argument("--data", default=None, help="existing shards dir with train-*.tar and test-*.tar (default: build "
                                                "Fashion-MNIST into OUT/data)")
    p.add_argument("--train-size", type=int, default=2000, help="training images (Fashion-MNIST subset)")
    p.add_argument("--test-size", type=int, default=2000, help="test images (Fashion-MNIST subset)")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--model", default=SMALL_VIT, help="timm model of teacher and students")
    p.add_argument("--model-args", default=",".join(SMALL_VIT_ARGS), help="timm model arguments KEY=VALUE,...")
    p.add_argument("--teacher", default=None, help="teacher spec (default: train a small ViT on the train split)")
    p.add_argument("--weights", default=None, help="weights of --teacher")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=16, help="pretraining epochs of every student")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--blr", type=float, default=1.5e-3, help="pretraining base lr (per 256 images)")
    p.add_argument("--ks", default="1,2,4,8,16", help="stored views per image of the cached arms")
    p.add_argument("--codecs", default="fp16,int8", help="codecs compared at K=8 (int8 is used for the K sweep)")
    p.add_argument("--equal-budget", default="",
                   help="extra arms 'K:codec,...' at the same bytes as 8:int8, e.g. 16:int4,16:pca:32")
    p.add_argument("--taps", default="final", help="teacher taps to compare (tap ablation; one cache per tap)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="CI form: few images, one epoch, online vs K=2")
    p.add_argument("--write-doc", action="store_true", help="write docs/study.md from the results")
    a = p.parse_args()
    if a.quick:
        a.train_size, a.test_size, a.teacher_epochs, a.epochs = 400, 200, 2, 1
        a.ks, a.codecs, a.seeds, a.equal_budget, a.batch_size = "2", "int8", "0", "", 32
    return a


def run(*cmd: str, log: str) -> str:
    """Run a project command, tee its output to a log file; stdout's last line is returned."""
    t0 = time.time()
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}\n")
    if p.returncode != 0:
        sys.exit(f"study: command failed ({p.returncode}), see {log}:\n{p.stderr[-3000:]}")
    print(f"  ({time.time() - t0:.0f}s)", flush=True)
    return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""


def model_flags(a: argparse.Namespace, flag: str) -> list[str]:
    return [x for kv in a.model_args.split(",") if kv for x in (flag, kv)]


def main() -> None:
    a = parse()
    out = os.path.abspath(a.out)
    logs = os.path.join(out, "logs")
    t_start = time.time()
    results: dict = {"config": vars(a), "arms": {}, "machine": machine()}

    # 1. data
    data = a.data or os.path.join(out, "data")
    if not a.data and not os.path.exists(os.path.join(data, "classes.json")):
        run(PY, "pipelines/study/make_data.py", "--out", data, "--train-size", str(a.train_size),
            "--test-size", str(a.test_size), "--shard-size", str(max(100, a.train_size // 8)), log=f"{logs}/data.log")
    train, test = shards(data, "train"), shards(data, "test")
    anchor = os.path.join(out, "anchor.json")
    if os.path.exists(anchor):
        with open(anchor) as f:
            results.update(json.load(f))
    else:
        results["raw_pixel_knn_top1"] = raw_pixel_knn(*load_pixels(train), *load_pixels(test))
    if "raw_pixel_knn_top1_full" not in results and not a.data and not a.quick:  # as published (about 85%)
        import importlib.util

        spec = importlib.util.spec_from_file_location("make_data", os.path.join(ROOT, "pipelines/study/make_data.py"))
        md = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(md)
        (xt, yt), (xv, yv) = md.load_split(md.PACKAGE_DIR, "train"), md.load_split(md.PACKAGE_DIR, "test")
        results["raw_pixel_knn_top1_full"] = raw_pixel_knn(*tensors(xt, yt), *tensors(xv, yv))
    with open(anchor, "w") as f:
        json.dump({k: v for k, v in results.items() if k.startswith("raw_pixel")}, f)

    # 2. teacher
    if a.teacher:
        teacher, tweights = a.teacher, a.weights
    else:
        tdir = os.path.join(out, "teacher")
        tweights = os.path.join(tdir, "best.safetensors")
        if not os.path.exists(tweights):
            run(PY, "-m", "mdtrain", "finetune", "--model", a.model, *model_flags(a, "--model-arg"),
                "--train", train, "--val", test, "--out", tdir, "--epochs", str(a.teacher_epochs),
                "--warmup-epochs", "1", "--batch-size", str(a.batch_size), "--lr", "1e-3", "--layer-decay", "1.0",
                "--image-size", str(a.image_size), "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
                "--drop-path", "0.1", "--global-pool", "avg", "--crop-scale", "0.35", "1.0", "--color-jitter", "0",
                "--workers", str(a.workers), log=f"{logs}/teacher.log")
        teacher = f"timm:{a.model}"
    teacher_flags = ["--teacher", teacher]
    if not a.teacher:  # the trained classifier pools patch tokens (fc_norm): build the teacher the same way
        teacher_flags += [*model_flags(a, "--teacher-arg"), "--teacher-arg", "global_pool=avg"]
    results["teacher"] = {"spec": teacher, "weights": tweights}
    if not a.teacher:  # a trained timm classifier: its own features are the ceiling
        done = os.path.join(out, "teacher", "eval.json")
        if not os.path.exists(done):
            with open(done, "w") as f:
                json.dump(evaluate_backbone(a, tweights, train, test, logs, "teacher"), f)
        with open(done) as f:
            results["teacher"].update(json.load(f))

    # 3. caches, 4. students, 5. metrics
    ks = [int(k) for k in a.ks.split(",") if k]
    arms = [("online-fresh", None, None, tap) for tap in a.taps.split(",")]
    for tap in a.taps.split(","):
        arms += [(f"K={k} int8" + tap_suffix(tap, a), k, "int8", tap) for k in ks]
        arms += [(f"K=8 {c}" + tap_suffix(tap, a), 8, c, tap) for c in a.codecs.split(",") if c != "int8"]
        budget = [kc.split(":", 1) for kc in a.equal_budget.split(",") if kc]  # K:CODEC, CODEC may be pca:R
        arms += [(f"K={k} {codec}" + tap_suffix(tap, a), int(k), codec, tap) for k, codec in budget]
    seeds = [int(s) for s in a.seeds.split(",")]
    floor, tap0 = [], a.taps.split(",")[0]
    for seed in seeds:  # the same students before any step (--stop-after 0)
        rdir = os.path.join(out, "students", "random-init", f"seed{seed}")
        pretrain(a, rdir, seed, [*online_flags(a, teacher_flags, tweights, tap0, train), "--stop-after", "0"], logs)
        floor.append({"seed": seed, **evaluate_student(a, rdir, teacher_flags, tweights, tap0, train, test, logs)})
    results["floor"] = {"runs": floor, **summarize(floor)}
    for name, k, codec, tap in arms:
        cache = None
        if k is not None:
            cache = run(PY, "-m", "mdcache", "extract", *teacher_flags, "--weights", tweights, "--tap", tap,
                        "--source", train, "--cache", os.path.join(out, "caches"), "--views", str(k), "--codec", codec,
                        "--image-size", str(a.image_size), "--batch-size", "64", "--workers", str(a.workers),
                        log=f"{logs}/extract.log")
        runs = []
        for seed in seeds:
            sdir = os.path.join(out, "students", slug(name), f"seed{seed}")
            source = ["--cache", cache] if cache else online_flags(a, teacher_flags, tweights, tap, train)
            pretrain(a, sdir, seed, source, logs)
            runs.append({"seed": seed, **evaluate_student(a, sdir, teacher_flags, tweights, tap, train, test, logs)})
        results["arms"][name] = {"k": k, "codec": codec, "tap": tap, "cache": cache, "runs": runs,
                                 **summarize(runs)}
    results["wall_seconds"] = round(time.time() - t_start, 1)

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(out, "study.png"))
    table = markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    if a.write_doc:
        write_doc(results, table, out)
    print(f"study done in {results['wall_seconds'] / 60:.1f} min: {out}/results.json, {out}/study.png")


def online_flags(a: argparse.Namespace, teacher_flags: list[str], tweights: str, tap: str, train: str) -> list[str]:
    return [*teacher_flags, "--teacher-weights", tweights, "--tap", tap, "--source", train, "--fresh-crops",
            "--image-size", str(a.image_size)]


def pretrain(a: argparse.Namespace, sdir: str, seed: int, source_flags: list[str], logs: str) -> None:
    """One student: same architecture, schedule and seed handling in every arm. An interrupted student
    resumes from its last checkpoint; a finished one (SDIR/done) is skipped."""
    done = os.path.join(sdir, "done")
    if os.path.exists(done):
        return
    run(PY, "-m", "mdtrain", "pretrain", *source_flags, "--student", a.model, *model_flags(a, "--student-arg"),
        "--epochs", str(a.epochs), "--warmup-epochs", "1", "--batch-size", str(a.batch_size), "--blr", str(a.blr),
        "--seed", str(seed), "--workers", str(a.workers), "--out", sdir, "--no-progress", "--resume", "auto",
        log=f"{logs}/pretrain.log")
    open(done, "w").close()


def tap_suffix(tap: str, a: argparse.Namespace) -> str:
    return f" tap={tap}" if len(a.taps.split(",")) > 1 else ""


def slug(name: str) -> str:
    return name.replace("=", "").replace(" ", "-").replace(":", "-")


def shards(data: str, split: str) -> str:
    names = sorted(f for f in os.listdir(data) if f.startswith(f"{split}-") and f.endswith(".tar"))
    if not names:
        sys.exit(f"study: no {split}-*.tar shards in {data}")
    first, last = names[0][len(split) + 1:-4], names[-1][len(split) + 1:-4]
    return os.path.join(data, f"{split}-{{{first}..{last}}}.tar") if first != last else os.path.join(data, names[0])


def evaluate_backbone(a: argparse.Namespace, weights: str, train: str, test: str, logs: str, tag: str) -> dict:
    knn = json.loads(run(PY, "-m", "mdtrain", "knn", "--weights", weights, "--train", train, "--val", test,
                         "--workers", str(a.workers), log=f"{logs}/knn.log"))
    lp = json.loads(run(PY, "-m", "mdtrain", "linprobe", "--weights", weights, "--train", train, "--val", test,
                        "--workers", str(a.workers), log=f"{logs}/linprobe.log"))
    return {"knn_top1": knn["top1"], "linprobe_top1": lp["top1"]}


def evaluate_student(a: argparse.Namespace, sdir: str, teacher_flags: list[str], tweights: str, tap: str, train: str,
                     test: str, logs: str) -> dict:
    """Held-out masked-feature loss on fresh test crops, k-NN and linear probe of one student (kept in
    SDIR/eval.json, so a resumed study does not measure twice)."""
    done = os.path.join(sdir, "eval.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    loss = json.loads(run(PY, "-m", "mdtrain", "distill-loss", "--ckpt", os.path.join(sdir, "last.ckpt"),
                          *teacher_flags, "--teacher-weights", tweights,
                          "--tap", tap, "--source", test, "--image-size", str(a.image_size),
                          "--workers", str(a.workers), log=f"{logs}/distill-loss.log"))
    out = {"heldout_loss": loss["loss"],
           **evaluate_backbone(a, os.path.join(sdir, "student.safetensors"), train, test, logs, sdir)}
    with open(done, "w") as f:
        json.dump(out, f)
    return out


def summarize(runs: list[dict]) -> dict:
    import numpy as np

    out = {}
    for key in ("heldout_loss", "knn_top1", "linprobe_top1"):
        vals = np.array([r[key] for r in runs], dtype=float)
        out[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                    "min": float(vals.min()), "max": float(vals.max())}
    return out


def load_pixels(spec: str):
    """Grayscale pixels [N, H*W] float32 and labels of a shard spec, decoded by the project's own reader."""
    import numpy as np
    import torch

    sys.path.insert(0, ROOT)
    from mdcache.sources import iter_samples, list_source
    from mdcache.views import decode_image

    xs, ys = [], []
    for shard in list_source(spec):
        for s in iter_samples(shard):
            xs.append(np.asarray(decode_image(s.data).convert("L"), dtype=np.float32).reshape(-1))
            ys.append(s.label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def tensors(images, labels):
    import torch

    return torch.from_numpy(images.reshape(len(images), -1).astype("float32")), torch.from_numpy(labels.astype("int64"))


def raw_pixel_knn(xt, yt, xv, yv, k: int = 20) -> float:
    """Sanity anchor: the project's k-NN evaluator on raw pixels (the dataset's published benchmark puts
    k-NN on raw pixels near 85% on the full 60k/10k split)."""
    sys.path.insert(0, ROOT)
    from mdtrain.evaluate import knn_classify

    return knn_classify(xt - xt.mean(0), yt, xv - xt.mean(0), yv, k=k)["top1"]


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available()}


def plot(results: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("heldout_loss", "held-out masked-feature loss (fresh test crops)"), ("knn_top1", "k-NN top-1 (%)"),
               ("linprobe_top1", "linear-probe top-1 (%)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sweep = sorted(((v["k"], v) for n, v in results["arms"].items() if v["codec"] == "int8"), key=lambda t: t[0])
    for ax, (key, title) in zip(axes, metrics):
        if sweep:
            ax.errorbar([k for k, _ in sweep], [v[key]["mean"] for _, v in sweep],
                        yerr=[v[key]["std"] for _, v in sweep], marker="o", capsize=3, label="cached, int8")
        for name, v in results["arms"].items():
            if v["k"] is None:
                ax.axhline(v[key]["mean"], color="C1", ls="--", label=name)
            elif v["codec"] != "int8":
                ax.errorbar([v["k"]], [v[key]["mean"]], yerr=[v[key]["std"]], marker="s", capsize=3, ls="",
                            label=f"cached, {v['codec']} (K={v['k']})")
        ax.axhline(results["floor"][key]["mean"], color="gray", ls=":", label="random init")
        if key in results["teacher"]:
            ax.axhline(results["teacher"][key], color="C2", ls="-.", label="teacher")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stored views per image K")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def fmt(m: dict) -> str:
    return f"{m['mean']:.4f} ± {m['std']:.4f}" if m["mean"] < 10 else f"{m['mean']:.2f} ± {m['std']:.2f}"


def markdown(results: dict) -> str:
    rows = ["| arm | held-out loss (lower is better) | k-NN top-1 % | linear probe top-1 % |", "|---|---|---|---|"]
    for name, v in results["arms"].items():
        rows.append(f"| {name} | {fmt(v['heldout_loss'])} | {fmt(v['knn_top1'])} | {fmt(v['linprobe_top1'])} |")
    f = results["floor"]
    rows.append(f"| random init (floor) | {fmt(f['heldout_loss'])} | {fmt(f['knn_top1'])} "
                f"| {fmt(f['linprobe_top1'])} |")
    t = results["teacher"]
    if "knn_top1" in t:
        rows.append(f"| teacher (ceiling) | - | {t['knn_top1']:.2f} | {t['linprobe_top1']:.2f} |")
    rows.append(f"| raw pixels, study subset (sanity) | - | {results['raw_pixel_knn_top1']:.2f} | - |")
    if "raw_pixel_knn_top1_full" in results:
        rows.append(f"| raw pixels, full 60k/10k (sanity, published ~85) | - | "
                    f"{results['raw_pixel_knn_top1_full']:.2f} | - |")
    return "\n".join(rows) + "\n"


def write_doc(results: dict, table: str, out: str) -> None:
    import shutil

    os.makedirs(os.path.join(ROOT, "docs", "study"), exist_ok=True)
    shutil.copy(os.path.join(out, "study.png"), os.path.join(ROOT, "docs", "study", "study.png"))
    shutil.copy(os.path.join(out, "results.json"), os.path.join(ROOT, "docs", "study", "results.json"))
    path = os.path.join(ROOT, "docs", "study", "table.md")
    with open(path, "w") as f:
        f.write(table)
    print("wrote docs/study/study.png, results.json, table.md (docs/study.md embeds them)")


if __name__ == "__main__":
    main()
