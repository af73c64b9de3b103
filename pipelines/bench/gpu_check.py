"""The one-shot GPU check: what a machine with a GPU measures in minutes, written to one JSON.

    bash pipelines/bench/gpu_check.sh [--out runs/gpu_check] [--tiny] [--dry-run]

No network: random-init teachers and students, data made on the spot (pipelines/bench/make_photos.py).
On one GPU (about 6-8 minutes; --budget-s, 420 by default, counted from the start of gpu_check.sh, stops
a stage still running at it and skips the rest):

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
  tests        `pytest -m cuda`: exact resume (pretrain, finetune) and online == offline on the GPU with
               --deterministic, a full finetune recipe, extraction on the GPU against the teacher on the CPU

--tiny runs every stage on the CPU with a tiny teacher and student in a minute (CI runs it); --dry-run
prints the stages and writes the plan without running them. A stage that fails is recorded with its error
and the others still run; the JSON is rewritten after every stage, so a machine taken away keeps the rest.
Without a GPU (and without --tiny) it writes why, with nvidia-smi's answer, and exits 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines" / "bench"))

from mdcache.devices import resolve_device  # noqa: E402  (auto: this rank's GPU, else the CPU)

TINY_CLIP = str(ROOT / "tests" / "assets" / "tiny-clip.json")
STAGES = ("extraction", "training", "syncs", "codecs", "replay", "decode", "tests")
NEEDED = ("open_clip", "timm", "webdataset", "zarr", "numcodecs", "typer", "rich", "safetensors", "fsspec",
          "matplotlib", "skimage", "pytest", "pytest_timeout", "yaml", "huggingface_hub", "PIL")


def settings(tiny: bool) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if tiny:
        return {"teacher": f"open_clip:{TINY_CLIP}", "size": 64, "images": 64, "shards": 2, "views": 2,
                "batch": 8, "students": {"tiny": ["vit_tiny_patch16_224"]}, "student_batch": 8, "workers": 1,
                "bench_batches": 2, "loader_batches": 4, "teacher_batches": 0}
    # 2048 images: each training lane gets 2 full batches of 256 per epoch (timed batches never cross an
    # epoch, which restarts the loader), and the extraction's 16 shards keep 15 workers busy.
    # Extraction batches of 32 images (256 views per teacher call): 4 per shard, so the 15 workers reach a
    # steady state instead of each making the one batch the GPU then waits for.
    return {"teacher": "clip-b16", "size": 224, "images": 2048, "shards": 16, "views": 8, "batch": 32,
            "students": {"vit_b16": ["vit_base_patch16_224"], "vit_s16": ["vit_small_patch16_224"]},
            "student_batch": 256, "workers": max(1, min(15, cores - 1)), "bench_batches": 6, "loader_batches": 6,
            "teacher_batches": 16}


def training_workers(s: dict) -> int:
    """Loader lanes for the training stages: as many as the workers, but each with 2 full batches per epoch."""
    return max(1, min(s["workers"], s["images"] // (2 * s["student_batch"])))


def extraction(s: dict, spec: str, root: str, device: str, out: dict, save=lambda: None) -> dict:
    """Fills `out` as it goes, saved after each bench: a stage cut short keeps what it measured."""
    from mdcache import bench

    for where in ("workers", "device", "device-decode"):
        if where != "workers" and "cache" not in out:
            out[f"replay_on_{where}"] = {"skipped": "the CPU-replay run failed: this one would the same way"}
            continue
        cfg = bench.BenchConfig(source=spec, teacher=s["teacher"], random_init=True, image_size=s["size"],
                                views=s["views"], codec="int8", batch_size=s["batch"], workers=s["workers"],
                                device=device, root=os.path.join(root, f"extract-{where}"), repeats=2,
                                replay_on=where, teacher_batches=s["teacher_batches"])
        try:
            r = bench.bench(cfg)
        except Exception as e:  # recorded; the run of another replay may still work
            out[f"replay_on_{where}"] = {"error": failure(e)}
            continue
        out[f"replay_on_{where}"] = {k: r[k] for k in ("extract_views_per_s", "teacher_only_views_per_s", "ratio",
                                                      "data_wait", "overhead_share", "device", "precision") if k in r}
        out[f"replay_on_{where}"]["peak_gpu_mb"] = r.get("peak_gpu_mb")
        if where == "workers":  # the cache the training stages read (device-decode on a GPU makes an nvjpeg one)
            out["cache"] = r["cache"]
        save()
    return out


def failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n" + "".join(traceback.format_tb(e.__traceback__)[-4:])


def training(s: dict, cache: str, device: str, out: dict, save=lambda: None) -> dict:
    """Fills `out` student by student, saved after each bench (a stage cut short keeps what it measured)."""
    from mdtrain import bench

    workers = training_workers(s)
    for name, (student,) in s["students"].items():
        cfg = bench.BenchConfig(cache=cache, student=student, teacher=s["teacher"], random_init=True,
                                batch_size=s["student_batch"], batches=s["bench_batches"], warmup=2,
                                loader_batches=s["loader_batches"], repeats=1, workers=workers, device=device)
        first = not out
        try:
            r = out[name] = {**bench.bench(cfg), "workers": workers}
            r["loader_images_per_core"] = r["loader_targets_ips"] / workers
        except Exception as e:
            out[name] = {"error": failure(e)}
            continue
        save()
        if first:  # the first student again, the workers only reading files and the GPU decoding (nvJPEG);
            try:    # no online phase (teacher=None): its rate would be the same as above
                d = bench.bench(replace(cfg, replay_on="device-decode", teacher=None))
                r["device_decode"] = {"loader_targets_ips": d["loader_targets_ips"],
                                      "cached_step_ips": d["cached_step_ips"],
                                      "loader_images_per_core": d["loader_targets_ips"] / workers}
            except Exception as e:
                r["device_decode"] = {"error": failure(e)}
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
                            batch_size=max(1, s["student_batch"] // 4), workers=training_workers(s), epochs=100,
                            warmup_epochs=0, lr=1e-4, progress=False, log_every=log_every, stop_after=steps,
                            device=device)
    cuda = resolve_device(device).type == "cuda"
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

    dev = resolve_device(device)
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

    dev = resolve_device(device)
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

    dev = resolve_device(device)
    datas = [smp.data for shard in sources.list_source(spec) for smp in sources.iter_samples(shard)][:256]
    files = [views.encoded_tensor(d) for d in datas]
    recipe = views.ViewRecipe(image_size=size, views=8, color_jitter=0.4)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    worst, differ, n, refused = 0, 0, 0, []
    for d, x in zip(datas, views.decode_batch(files, dev, refused=refused)):
        diff = (x.cpu().int() - views.image_tensor(views.decode_image(d)).int()).abs()
        worst, differ, n = max(worst, int(diff.max())), differ + int((diff > 0).sum()), n + diff.numel()
    params = [views.sample_views(f"k{i}", *views.image_size_of(d), recipe) for i, d in enumerate(datas)]
    rates = {}
    for name, fn in (("decode", lambda: views.decode_batch(files, dev)),
                     ("decode_and_8_views", lambda: views.replay_batch(views.decode_batch(files, dev), params, size,
                                                                       views.REPLAY_TENSOR))):
        fn()
        sync()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        rates[f"{name}_images_per_s"] = len(files) / best
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for d in datas:
        views.decode_image(d)
    rates["pil_decode_images_per_s_one_core"] = len(datas) / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return {"device": str(dev), "images": len(datas), "max_level_difference": worst,
            "fraction_of_pixels_that_differ": differ / max(n, 1),
            "refused_by_the_device_decoder": len(refused), **rates}  # those PIL decoded: 0, or the rates mislead


def cuda_tests(tiny: bool, seconds: float) -> dict:
    """`pytest -m cuda` in its own process group, killed whole at the deadline (its mdtrain children too)."""
    if tiny:
        return {"skipped": "tiny mode: the CPU suite runs these tests already"}
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        out, _ = p.communicate(timeout=seconds)
    except BaseException:  # the deadline, or the stage's alarm
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return {"error": f"timed out after {time.time() - t0:.0f} s", "output_tail": (out or "")[-2000:]}
    lines = out.strip().splitlines()
    r = {"returncode": p.returncode, "summary": lines[-1:], "seconds": round(time.time() - t0, 1),
         "failures": [x for x in lines if x.startswith(("FAILED", "ERROR"))][:10]}
    if p.returncode != 0:
        r["error"] = f"pytest -m cuda exited {p.returncode}"
    return r


class StageTimeout(BaseException):
    """A BaseException: the stages' own `except Exception` (one failed bench, the next one runs) must not
    swallow the deadline."""


def _alarm(signum, frame):
    raise StageTimeout("the stage ran past --budget-s")


def photos_for(s: dict, out: str) -> str:
    """The bench photos, made again when the settings changed or a run was cut short while making them."""
    photos, want = os.path.join(out, "photos"), {"images": s["images"], "shards": s["shards"]}
    spec = os.path.join(photos, f"photos-{{000000..{s['shards'] - 1:06d}}}.tar")
    made = Path(photos, "made.json")
    if not made.exists() or json.loads(made.read_text()) != want:
        from make_photos import main as make_photos

        shutil.rmtree(photos, ignore_errors=True)
        make_photos(["--out", photos, "--images", str(s["images"]), "--shards", str(s["shards"])])
        made.write_text(json.dumps(want))
    return spec


def machine() -> dict:
    """What a failed or slow stage may come down to: the driver, and the shared memory loader workers use."""
    out: dict = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                 "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    if os.path.isdir("/dev/shm"):
        out["dev_shm_gb"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"not run: {e}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--tiny", action="store_true", help="every stage on the CPU with tiny models (CI)")
    ap.add_argument("--dry-run", action="store_true", help="write the plan, run nothing")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds from the start of gpu_check.sh (its "
                    "wheel install and torch's start-up included): a stage still running then is stopped, later "
                    "ones are skipped (recorded as such); the tests get what is left")
    a = ap.parse_args()
    s = settings(a.tiny)
    stages = [x for x in a.stages.split(",") if x]
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.exit(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    os.makedirs(a.out, exist_ok=True)
    result: dict = {"settings": s, "stages": stages, "tiny": a.tiny, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "machine": machine()}
    path = Path(a.out) / "gpu_check.json"
    if a.dry_run:
        result["dry_run"] = True
        path.write_text(json.dumps(result, indent=1))
        print("\n".join(f"would run: {x}" for x in stages))
        print(path)
        return
    path.unlink(missing_ok=True)  # an old run's JSON never passes for this one's
    path.write_text(json.dumps(result, indent=1))  # from here on there is always a JSON to read
    shutil.rmtree(os.path.join(a.out, "caches"), ignore_errors=True)  # bench refuses a root with committed shards
    shutil.rmtree(os.path.join(a.out, "sync-run"), ignore_errors=True)
    if result["machine"].get("dev_shm_gb", 64) < 4:
        result["warnings"] = [f"/dev/shm holds {result['machine']['dev_shm_gb']} GB: loader workers pass batches "
                              "through it (a few GB here); a 'Bus error' in a stage comes from that"]
    if not a.tiny and not a.dry_run and a.device != "cpu" and not torch.cuda.is_available():
        result["error"] = ("no CUDA device visible to torch (driver too old for this torch's CUDA "
                           f"{torch.version.cuda}? see machine.nvidia_smi); --tiny runs the CPU version")
        path.write_text(json.dumps(result, indent=1))
        print(result["error"], file=sys.stderr)
        sys.exit(2)
    t_all = float(os.environ.get("MDCACHE_CHECK_T0") or time.time())  # gpu_check.sh's start: the budget's clock
    try:
        missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"not installed: {', '.join(missing)} (pipelines/bench/gpu_wheels.sh; the machine's "
                              "image must hold the rest: docs/benchmarks.md)")
        spec = photos_for(s, a.out)
    except Exception as e:
        result["error"] = failure(e)
        path.write_text(json.dumps(result, indent=1))
        sys.exit(f"gpu_check: {type(e).__name__}: {e}")
    signal.signal(signal.SIGALRM, _alarm)
    timings: dict = {}

    def save():
        path.write_text(json.dumps(result, indent=1, default=str))
    cache = None
    for stage in stages:
        t0, left = time.time(), a.budget_s - (time.time() - t_all)
        if 0 < left < 60 and stage == "tests":
            left = 0  # too little for a test run's start-up: skipped, not killed half-way
        if left > 0:
            signal.alarm(math.ceil(left))  # nothing runs past the budget, even inside a stage
        try:
            if left <= 0:
                result[stage] = {"skipped": f"past --budget-s {a.budget_s:g}"}
            elif stage == "extraction":
                extraction(s, spec, os.path.join(a.out, "caches"), a.device, result.setdefault(stage, {}), save)
                cache = result[stage].get("cache")
            elif stage in ("training", "syncs"):
                if cache is None:
                    result[stage] = {"skipped": "needs the extraction stage's cache"}
                elif stage == "training":
                    training(s, cache, a.device, result.setdefault(stage, {}), save)
                else:
                    result[stage] = syncs_per_step(s, cache, a.device, a.out)
            elif stage == "codecs":
                result[stage] = codecs_on_device(a.device)
            elif stage == "replay":
                result[stage] = replay_on_device(spec, s["size"], a.device)
            elif stage == "decode":
                result[stage] = decode_on_device(spec, s["size"], a.device)
            elif stage == "tests":
                result[stage] = cuda_tests(a.tiny, left)
        except (Exception, StageTimeout) as e:  # recorded beside what the stage measured; the next stage runs
            result[stage] = {**(result.get(stage) or {}), "error": failure(e)}
            print(f"stage {stage} failed: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            signal.alarm(0)
        timings[stage] = round(time.time() - t0, 1)
        result["seconds"] = timings
        save()  # after every stage too: a machine taken away keeps the rest
    result["total_seconds"] = round(time.time() - t_all, 1)
    result["failed_stages"] = [x for x in stages if isinstance(result.get(x), dict) and (
        "error" in result[x] or any(isinstance(v, dict) and "error" in v for v in result[x].values()))]
    path.write_text(json.dumps(result, indent=1, default=str))
    print(path)
    if result["failed_stages"]:
        sys.exit(f"failed stage(s): {', '.join(result['failed_stages'])} (their errors are in {path})")


if __name__ == "__main__":
    main()
