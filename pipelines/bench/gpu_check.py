"""The one-shot GPU check: what a machine with a GPU measures in minutes, written to one JSON.

    bash pipelines/bench/gpu_check.sh [--out runs/gpu_check] [--tiny] [--dry-run]

No network: random-init teachers and students, data made on the spot (pipelines/bench/make_photos.py).
On one GPU (about 6-8 minutes):

  extraction   CLIP-B/16 (random weights, bf16 where native): `mdcache bench` full pipeline vs teacher only,
               views replayed in the loader workers (CPU), on the GPU (--replay-on device), and decoded and
               replayed on the GPU (--replay-on device-decode: nvJPEG)
  training     ViT-B/16 and ViT-S/16 students at batch 256 from that cache: `mdtrain bench` loader, cached
               step, online step, in-memory compute ratio, peak GPU memory, loader images/s per core; the
               ViT-B/16 bench again with --replay-on device-decode (the loader and the step with nvJPEG)
  syncs        host-device synchronizations per training step outside logging steps
               (torch.cuda.set_sync_debug_mode), counted over real steps
  codecs       int8/int4/pca encode on the GPU against the CPU (same bytes or within rounding)
  replay       the tensor replay on the GPU against the CPU (levels that differ)
  decode       nvJPEG (torchvision, batched) against PIL on the same JPEGs: levels that differ, images/s of
               each (PIL on one core), and decode + replay of 8 views per image on the GPU
  tests        `pytest -m cuda` (exact resume and online == offline on the GPU, with --deterministic)

--tiny runs every stage on the CPU with a tiny teacher and student in a minute (CI runs it); --dry-run
prints the stages and writes the plan without running them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines" / "bench"))

TINY_CLIP = str(ROOT / "tests" / "assets" / "tiny-clip.json")
STAGES = ("extraction", "training", "syncs", "codecs", "replay", "decode", "tests")


def settings(tiny: bool) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if tiny:
        return {"teacher": f"open_clip:{TINY_CLIP}", "size": 64, "images": 64, "shards": 2, "views": 2,
                "batch": 8, "students": {"tiny": ["vit_tiny_patch16_224"]}, "student_batch": 8, "workers": 1,
                "bench_batches": 2, "loader_batches": 4}
    return {"teacher": "clip-b16", "size": 224, "images": 1024, "shards": 8, "views": 8, "batch": 128,
            "students": {"vit_b16": ["vit_base_patch16_224"], "vit_s16": ["vit_small_patch16_224"]},
            "student_batch": 256, "workers": max(1, min(15, cores - 1)), "bench_batches": 10, "loader_batches": 20}


def extraction(s: dict, spec: str, root: str, device: str) -> dict:
    from mdcache import bench

    out = {}
    for where in ("workers", "device", "device-decode"):
        cfg = bench.BenchConfig(source=spec, teacher=s["teacher"], random_init=True, image_size=s["size"],
                                views=s["views"], codec="int8", batch_size=s["batch"], workers=s["workers"],
                                device=device, root=os.path.join(root, f"extract-{where}"), repeats=2,
                                replay_on=where)
        r = bench.bench(cfg)
        out[f"replay_on_{where}"] = {k: r[k] for k in ("extract_views_per_s", "teacher_only_views_per_s", "ratio",
                                                      "device", "precision") if k in r}
        out[f"replay_on_{where}"]["peak_gpu_mb"] = r.get("peak_gpu_mb")
        if where == "workers":  # the cache the training stages read (device-decode on a GPU makes an nvjpeg one)
            out["cache"] = r["cache"]
    return out


def training(s: dict, cache: str, device: str) -> dict:
    from mdtrain import bench

    out = {}
    for name, (student,) in s["students"].items():
        cfg = bench.BenchConfig(cache=cache, student=student, teacher=s["teacher"], random_init=True,
                                batch_size=s["student_batch"], batches=s["bench_batches"], warmup=2,
                                loader_batches=s["loader_batches"], repeats=1, workers=s["workers"], device=device)
        r = bench.bench(cfg)
        r["loader_images_per_core"] = r["loader_targets_ips"] / max(1, s["workers"])
        if not out:  # the first student again, the workers only reading files and the GPU decoding (nvJPEG)
            d = bench.bench(replace(cfg, replay_on="device-decode", loader_batches=max(2, s["loader_batches"] // 2)))
            r["device_decode"] = {"loader_targets_ips": d["loader_targets_ips"],
                                  "cached_step_ips": d["cached_step_ips"],
                                  "loader_images_per_core": d["loader_targets_ips"] / max(1, s["workers"])}
        out[name] = r
    return out


def syncs_per_step(s: dict, cache: str, device: str, out_dir: str) -> dict:
    """Real training steps with log_every=4, each host-device synchronization attributed to the step it happened
    in (CUDA's sync debug mode warns on each; the loop's batch fetch marks where a step starts)."""
    import collections

    from mdtrain import data
    from mdtrain import pretrain as pt

    steps, log_every = 9, 4
    counts, state = collections.Counter(), {"step": 0}
    to_device = data.to_device

    def counting_to_device(*args, **kwargs):
        state["step"] += 1
        return to_device(*args, **kwargs)

    def show(message, *args, **kwargs):
        if "synchroniz" in str(message).lower():
            counts[state["step"]] += 1

    name = next(iter(s["students"]))
    cfg = pt.PretrainConfig(cache=cache, out=os.path.join(out_dir, "sync-run"), student=s["students"][name][0],
                            batch_size=max(1, s["student_batch"] // 4), workers=s["workers"], epochs=100,
                            warmup_epochs=0, lr=1e-4, progress=False, log_every=log_every, stop_after=steps,
                            device=device)
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda:")
    pt.data.to_device = counting_to_device
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            pt.pretrain(cfg)
    finally:
        pt.data.to_device = to_device
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    logging = {k for k in range(1, steps + 1) if k % log_every == 0 or k == steps}
    plain = [counts.get(k, 0) for k in range(2, steps + 1) if k not in logging]  # step 1 pays one-time set-up
    return {"measured": cuda, "steps": steps, "log_every": log_every, "syncs_by_step": dict(sorted(counts.items())),
            "syncs_per_step_outside_logging_steps": max(plain) if plain else None,
            "syncs_per_logging_step": max((counts.get(k, 0) for k in logging), default=0),
            "note": "CUDA's sync debug mode; on a CPU nothing waits for a device (0 by definition)"}


def codecs_on_device(device: str) -> dict:
    from mdcache import codecs

    dev = torch.device("cuda") if device == "auto" and torch.cuda.is_available() else torch.device(
        "cpu" if device == "auto" else device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 196, 768, generator=g) * torch.linspace(0.1, 8, 768)
    out = {}
    for name in ("fp16", "int8", "int4", "pca:192"):
        c = codecs.get_codec(name)
        calib = c.calibrate(x) if c.calibrate else None
        on_dev = {k: (torch.as_tensor(v, device=dev) if not isinstance(v, (int, float, str, dict)) else v)
                  for k, v in (calib or {}).items()} if calib else None
        a = c.encode(x, calib)
        b = c.encode(x.to(dev), on_dev)
        differ = {k: float((torch.from_numpy(a[k]).float() != torch.from_numpy(b[k]).float()).float().mean())
                  for k in a}
        dec = c.decode({k: torch.from_numpy(v).to(dev) for k, v in b.items()}, on_dev).cpu()
        ref = c.decode({k: torch.from_numpy(v) for k, v in a.items()}, calib)
        out[name] = {"device": str(dev), "fraction_of_codes_that_differ": differ,
                     "decode_max_abs_diff": float((dec - ref).abs().max())}
    return out


def replay_on_device(spec: str, size: int, device: str) -> dict:
    from mdcache import sources, views

    dev = torch.device("cuda") if device == "auto" and torch.cuda.is_available() else torch.device(
        "cpu" if device == "auto" else device)
    recipe = views.ViewRecipe(image_size=size, views=8, color_jitter=0.4)
    worst, differ, n = 0, 0, 0
    for _, sample in zip(range(32), sources.iter_samples(sources.list_source(spec)[0])):
        image = views.decode_image(sample.data)
        params = views.sample_views(sample.key, image.height, image.width, recipe)
        a = views.view_pixels(image, params, size, views.REPLAY_TENSOR).int()
        b = views.view_pixels(image, params, size, views.REPLAY_TENSOR, device=dev).cpu().int()
        worst, differ, n = max(worst, int((a - b).abs().max())), differ + int((a != b).sum()), n + a.numel()
    return {"device": str(dev), "max_level_difference": worst, "fraction_of_pixels_that_differ": differ / n}


def decode_on_device(spec: str, size: int, device: str) -> dict:
    """nvJPEG against PIL: the same JPEGs decoded both ways, pixels compared, and each one's rate."""
    from mdcache import sources, views

    dev = torch.device("cuda") if device == "auto" and torch.cuda.is_available() else torch.device(
        "cpu" if device == "auto" else device)
    datas = [smp.data for shard in sources.list_source(spec) for smp in sources.iter_samples(shard)][:256]
    files = [views.encoded_tensor(d) for d in datas]
    recipe = views.ViewRecipe(image_size=size, views=8, color_jitter=0.4)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    worst, differ, n = 0, 0, 0
    for d, x in zip(datas, views.decode_batch(files, dev)):
        diff = (x.cpu().int() - views.image_tensor(views.decode_image(d)).int()).abs()
        worst, differ, n = max(worst, int(diff.max())), differ + int((diff > 0).sum()), n + diff.numel()
    params = [views.sample_views(f"k{i}", *views.image_size_of(d), recipe) for i, d in enumerate(datas)]
    rates = {}
    for name, fn in (("decode", lambda: views.decode_batch(files, dev)),
                     ("decode_and_8_views", lambda: [views.view_pixels(x, p, size, views.REPLAY_TENSOR) for x, p in
                                                     zip(views.decode_batch(files, dev), params)])):
        fn()
        sync()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        rates[f"{name}_images_per_s"] = len(files) / best
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for d in datas:
        views.decode_image(d)
    rates["pil_decode_images_per_s_one_core"] = len(datas) / (time.perf_counter() - t0)
    return {"device": str(dev), "images": len(datas), "max_level_difference": worst,
            "fraction_of_pixels_that_differ": differ / max(n, 1), **rates}


def cuda_tests(tiny: bool) -> dict:
    if tiny:
        return {"skipped": "tiny mode: the CPU suite runs these tests already"}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {"returncode": p.returncode, "summary": p.stdout.strip().splitlines()[-1:], "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--tiny", action="store_true", help="every stage on the CPU with tiny models (CI)")
    ap.add_argument("--dry-run", action="store_true", help="write the plan, run nothing")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stages", default=",".join(STAGES))
    a = ap.parse_args()
    s = settings(a.tiny)
    stages = [x for x in a.stages.split(",") if x]
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.exit(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    os.makedirs(a.out, exist_ok=True)
    result: dict = {"settings": s, "stages": stages, "tiny": a.tiny, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    path = Path(a.out) / "gpu_check.json"
    if a.dry_run:
        result["dry_run"] = True
        path.write_text(json.dumps(result, indent=1))
        print("\n".join(f"would run: {x}" for x in stages))
        print(path)
        return
    t_all = time.time()
    photos = os.path.join(a.out, "photos")
    spec = os.path.join(photos, f"photos-{{000000..{s['shards'] - 1:06d}}}.tar")
    if not Path(photos, "photos-000000.tar").exists():
        from make_photos import main as make_photos

        make_photos(["--out", photos, "--images", str(s["images"]), "--shards", str(s["shards"])])
    timings = {}
    cache = None
    for stage in stages:
        t0 = time.time()
        if stage == "extraction":
            result[stage] = extraction(s, spec, os.path.join(a.out, "caches"), a.device)
            cache = result[stage]["cache"]
        elif stage in ("training", "syncs"):
            if cache is None:
                sys.exit(f"stage {stage} needs the extraction stage's cache")
            result[stage] = training(s, cache, a.device) if stage == "training" else \
                syncs_per_step(s, cache, a.device, a.out)
        elif stage == "codecs":
            result[stage] = codecs_on_device(a.device)
        elif stage == "replay":
            result[stage] = replay_on_device(spec, s["size"], a.device)
        elif stage == "decode":
            result[stage] = decode_on_device(spec, s["size"], a.device)
        elif stage == "tests":
            result[stage] = cuda_tests(a.tiny)
        timings[stage] = round(time.time() - t0, 1)
        result["seconds"] = timings
        path.write_text(json.dumps(result, indent=1, default=str))  # after every stage: a timeout keeps the rest
    result["total_seconds"] = round(time.time() - t_all, 1)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(path)


if __name__ == "__main__":
    main()
