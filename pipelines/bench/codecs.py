"""What each target codec costs and keeps: bytes per view, fidelity, encode/decode speed, loader ratio.

    python pipelines/bench/codecs.py [--out runs/codecs] [--teachers clip,study] [--study runs/study]

For each teacher it extracts one fp16 cache (the reference), derives every other codec from it with
`mdcache transcode` (the real code path: calibration on the first 64 images, as extract does), and
measures, on the images the calibration did not see, each codec's decoded targets against fp16 after
per-token LayerNorm (mean and worst token cosine), the bytes it stores per view (compressed, as on
disk), its encode and decode speed on this machine's CPU, and `mdtrain bench`'s loader ratio (images
+ targets vs images only; target >= 0.8). Writes results.json, table.md and codecs.png under --out.

Teachers:
  clip   CLIP ViT-B/16 with RANDOM weights (no download here) on the photo set (pipelines/demo/make_data.py)
  study  the study's small ViT trained on Fashion-MNIST (pipelines/study/run.py makes it: --study DIR)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines" / "study"))
from run import SMALL_VIT, SMALL_VIT_ARGS  # noqa: E402  (the study's model)

from mdcache import codecs, open_cache  # noqa: E402

PY = sys.executable
CODECS = {"clip": ["int8", "int4", "pca:256", "pca:192", "pca:128", "pca:64"],
          "study": ["int8", "int4", "pca:48", "pca:32", "pca:24", "pca:16"]}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/codecs")
    p.add_argument("--teachers", default="clip,study")
    p.add_argument("--photos", default="runs/photos", help="the photo set (built if missing)")
    p.add_argument("--study", default="runs/study", help="a finished study: teacher/best.safetensors and data/")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--no-loader", action="store_true", help="skip the mdtrain bench loader ratios")
    return p.parse_args()


def run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout


def teacher_flags(name: str, a: argparse.Namespace) -> list[str]:
    if name == "clip":
        if not Path(a.photos, "train-000000.tar").exists():
            run(PY, "pipelines/demo/make_data.py", "--out", a.photos)
        return ["--teacher", "clip-b16", "--random-init", "--source",
                f"{a.photos}/train-{{000000..000003}}.tar,{a.photos}/val-000000.tar"]
    weights = Path(a.study, "teacher", "best.safetensors")
    if not weights.exists():
        sys.exit(f"{weights} is missing: run `python pipelines/study/run.py --out {a.study}` first (or pass --study)")
    return ["--teacher", f"timm:{SMALL_VIT}", *[x for kv in SMALL_VIT_ARGS for x in ("--teacher-arg", kv)],
            "--teacher-arg", "global_pool=avg", "--teacher-weights", str(weights), "--image-size", "28",
            "--source", f"{a.study}/data/train-{{000000..000007}}.tar"]


def held_out(cache, calib_images: int) -> list[str]:
    """Shards none of whose images the calibration saw (it takes the first images in shard order)."""
    n, out = 0, []
    for s in cache.shard_names:
        if n >= calib_images:
            out.append(s)
        n += cache.commits[s]["samples"]
    return out


def chunk_bytes(url: str, shards: list[str], cache) -> int:
    total = 0
    for s in shards:
        for d, _, files in os.walk(os.path.join(url, cache.commits[s]["path"])):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in files if f != "zarr.json")
    return total


def best_seconds(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(ref, cache, shards: list[str]) -> dict:
    meter = codecs.FidelityMeter()
    for s in shards:
        for v in range(ref.views):
            meter.update(torch.from_numpy(ref.read(s, v)[1]), torch.from_numpy(cache.read(s, v)[1]))
    samples = sum(cache.commits[s]["samples"] for s in shards)
    per_view = chunk_bytes(cache.url, shards, cache) / (samples * cache.views)
    codec = codecs.get_codec(cache.codec)
    x = torch.from_numpy(ref.read(shards[0], 0)[1][:32])  # 32 views of features
    calib = cache.calibration_on("cpu")
    enc = codec.encode(x, calib)
    tenc = {k: torch.from_numpy(v) for k, v in enc.items()}
    return {"codec": cache.codec, "cache": cache.url, "bytes_per_view": per_view, **meter.report(),
            "encode_views_per_s": len(x) / best_seconds(lambda: codec.encode(x, calib)),
            "decode_views_per_s": len(x) / best_seconds(lambda: codec.decode(tenc, calib)),
            "explained_variance": (cache.calibration or {}).get("explained_variance")}


def loader_ratio(url: str) -> float:
    cache = open_cache(url)
    patch = cache.image_size // cache.patch_grid[0]
    out = run(PY, "-m", "mdtrain", "bench", "--cache", url, "--student", "vit_tiny_patch16_224", "--student-arg",
              f"img_size={cache.image_size}", "--student-arg", f"patch_size={patch}", "--batches", "2", "--warmup", "1",
              "--loader-batches", "40",
              "--batch-size", "16", "--workers", "1", "--device", "cpu", "--json")
    return json.loads(out)["ratio_loader_targets_vs_images"]


def main() -> None:
    a = parse()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu": os.cpu_count(), "torch": torch.__version__}, "teachers": {}}
    for name in a.teachers.split(","):
        flags = teacher_flags(name, a)
        ref_url = run(PY, "-m", "mdcache", "extract", *flags, "--codec", "fp16", "--views", "2", "--root",
                      str(out / name), "--fidelity-images", "100000", "--workers", "1").strip().splitlines()[-1]
        ref = open_cache(ref_url)
        shards = held_out(ref, a.calib_images)
        rows = [measure(ref, ref, shards)]
        rows[0].update(open_cache(ref_url).stats()["fidelity"])  # fp16 against the fp32 teacher
        for c in CODECS[name]:
            url = run(PY, "-m", "mdcache", "transcode", ref_url, "--codec", c, "--calib-images", str(a.calib_images),
                      "--device", "cpu").strip().splitlines()[-1]
            rows.append(measure(ref, open_cache(url), shards))
        for r in rows:
            r["ratio_to_fp16"] = r["bytes_per_view"] / rows[0]["bytes_per_view"]
            if not a.no_loader:
                r["loader_ratio"] = loader_ratio(r["cache"])
            print(name, json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}))
        results["teachers"][name] = {"dim": ref.teacher_dim, "tokens": ref.manifest["teacher"]["tokens"],
                                     "held_out_shards": shards, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results))
    plot(results, out / "codecs.png")
    print(table(results))


def table(results: dict) -> str:
    lines = []
    for name, t in results["teachers"].items():
        lines += [f"\n**{name}** ({t['tokens']} tokens x {t['dim']} dims; fp16 against the fp32 teacher, the others "
                  "against fp16, on images the calibration did not see)\n",
                  "| codec | bytes/view | x fp16 | mean cos | worst cos | PCA expl. var. | encode views/s | "
                  "decode views/s | loader ratio |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in t["rows"]:
            ev = f"{r['explained_variance']:.4f}" if r.get("explained_variance") else ""
            lr = f"{r['loader_ratio']:.2f}" if "loader_ratio" in r else ""
            lines.append(f"| {r['codec']} | {r['bytes_per_view']:,.0f} | {r['ratio_to_fp16']:.3f} | "
                         f"{r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {ev} | {r['encode_views_per_s']:,.0f} | "
                         f"{r['decode_views_per_s']:,.0f} | {lr} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "mean_cosine", "mean"), (axes[1], "min_cosine", "worst token")):
        for name, t in results["teachers"].items():
            rows = t["rows"]
            ax.plot([r["ratio_to_fp16"] for r in rows], [1 - r[key] for r in rows], "o", label=name)
            for r in rows:
                ax.annotate(r["codec"], (r["ratio_to_fp16"], 1 - r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("stored bytes per view / fp16's"), ax.set_ylabel(f"1 - cosine ({label}), after LayerNorm")
        ax.grid(alpha=0.3), ax.legend()
    fig.suptitle("target codecs: fidelity against bytes (pipelines/bench/codecs.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
