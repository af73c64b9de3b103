"""The CUDA path, tested where its logic allows on a CPU: device mapping under torchrun, where collectives put
their buffers, the precision a GPU gets, uint8 transfers, what rides into loader workers, and the host reads
of a training step. `pytest -m cuda` adds what needs a GPU (pipelines/bench/gpu_check.sh runs it)."""
from __future__ import annotations

import collections
import pickle
import traceback
from datetime import timedelta

import pytest
import torch
from helpers import TRAIN_FLAGS, extract_cfg, invoke, shared_cache
from torch.overrides import TorchFunctionMode

from mdcache import devices, open_cache
from mdcache.errors import ConfigError


@pytest.fixture()
def two_gpus(monkeypatch):
    """A machine with two GPUs, as far as the device logic can tell (nothing runs on them)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    return chosen


@pytest.mark.parametrize("name,local,world,expected", [
    ("auto", 1, 2, "cuda:1"), ("cuda", 1, 2, "cuda:1"), ("cuda", 0, 1, "cuda:0"), ("cuda:1", 0, 1, "cuda:1"),
    ("cpu", 1, 2, "cpu")])
def test_every_cuda_device_maps_through_local_rank(two_gpus, monkeypatch, name, local, world, expected):
    """`--device cuda` under torchrun used to call set_device without an index (ValueError), and `cuda:0` put
    every rank on one GPU; extract never bound its GPU at all."""
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert devices.use_device(name) == torch.device(expected)
    assert two_gpus == ([torch.device(expected)] if expected != "cpu" else [])


def test_extract_binds_its_process_to_the_local_rank_gpu(two_gpus, monkeypatch, train_spec, tmp_path):
    """A regression to resolve_device in extract would leave every rank's libraries allocating on GPU 0."""
    from mdcache import extract, teachers

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    asked = []

    def no_teacher(*args, device, **kw):  # no GPU here: stop where the teacher would be loaded onto it
        asked.append(device)
        raise RuntimeError("stop")
    monkeypatch.setattr(teachers, "load_teacher", no_teacher)
    with pytest.raises(RuntimeError, match="stop"):
        extract.prepare(extract_cfg(train_spec, str(tmp_path), device="cuda"))
    assert two_gpus == asked == [torch.device("cuda:1")]


@pytest.mark.parametrize("name,local,world,message", [
    ("cuda:0", 1, 2, "a fixed GPU index with 2 processes"), ("cuda", 2, 3, "GPU 2 \\(LOCAL_RANK 2\\) does not exist"),
    ("auto", 5, 8, "this machine has 2 visible GPU"), ("gpu", 0, 1, "expected auto, cpu, cuda or cuda:N")])
def test_impossible_devices_are_clear_errors(two_gpus, monkeypatch, name, local, world, message):
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=message):
        devices.resolve_device(name)


def test_auto_precision_never_picks_emulated_bf16(monkeypatch):
    """`is_bf16_supported()` counts emulation: V100/T4 then ran bf16 slower than fp32. They get fp16 autocast
    with a loss scaler; GPUs with native bf16 get bf16; CPUs fp32."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert devices.resolve_precision("auto", gpu) == "fp16"
    with pytest.raises(ConfigError, match="Tesla V100 has no native bfloat16"):
        devices.resolve_precision("bf16", gpu)
    assert devices.grad_scaler(torch.device("cpu"), "fp16").is_enabled()
    assert not devices.grad_scaler(torch.device("cpu"), "bf16").is_enabled()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert devices.resolve_precision("auto", gpu) == "bf16"
    assert devices.resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="choose auto, fp32, bf16, fp16"):
        devices.resolve_precision("fp8", gpu)


def test_fp16_training_scales_the_loss_and_resumes_its_scaler(tmp_path_factory, train_spec, tmp_path):
    """The fp16 path (older GPUs) runs here on the CPU: GradScaler on, its state in the checkpoint."""
    from mdtrain.checkpoint import load_trainer_state

    url = shared_cache(tmp_path_factory, train_spec)
    out = tmp_path / "pt"
    r = invoke("pretrain", "--cache", url, *TRAIN_FLAGS, "--workers", "0", "--precision", "fp16", "--epochs", "1",
               "--stop-after", "3", "--out", out, module="mdtrain")
    assert r.exit_code == 0, r.stderr[-2000:]
    ck = load_trainer_state(str(out / "last.ckpt"), "pretrain")
    assert ck["scaler"] and ck["scaler"]["scale"] > 0 and ck["step"] == 3
    assert "fp16, device cpu" in " ".join(r.stderr.split()), r.stderr  # the run's log line says its precision
    r = invoke("pretrain", "--cache", url, *TRAIN_FLAGS, "--workers", "0", "--precision", "fp16", "--epochs", "1",
               "--stop-after", "2", "--resume", "auto", "--out", out, module="mdtrain")
    assert r.exit_code == 0 and load_trainer_state(str(out / "last.ckpt"), "pretrain")["step"] == 5


def test_process_groups_time_out_from_config_and_host_collectives_use_gloo(two_gpus, monkeypatch):
    """Rank 0 saves and uploads while the others wait in a collective: NCCL's 10-minute default killed long
    uploads. The timeout comes from --dist-timeout, and host-side agreement goes over a gloo group."""
    import torch.distributed as tdist

    from mdtrain import runtime

    made = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, timeout: made.append(("init", backend, timeout)))
    monkeypatch.setattr(tdist, "new_group", lambda backend, timeout: made.append(("group", backend, timeout)) or "G")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    runtime.init_distributed(torch.device("cuda", 1), timeout_min=90)
    try:
        assert made == [("init", "nccl", timedelta(minutes=90)), ("group", "gloo", timedelta(minutes=90))]
        assert runtime.control_group() == "G"
    finally:
        runtime._CONTROL.clear()


def test_rng_states_are_gathered_on_the_cpu_over_gloo(monkeypatch):
    """Under NCCL the gather buffers were CPU tensors for a collective that needs GPU ones: multi-GPU
    pretraining crashed at its first checkpoint. RNG states are CPU tensors: they go over the gloo group."""
    import torch.distributed as tdist

    from mdtrain import checkpoint, runtime

    gathered = []
    monkeypatch.setattr(runtime, "_CONTROL", ["gloo-group"])
    monkeypatch.setattr(tdist, "get_backend", lambda group=None: "gloo" if group == "gloo-group" else "nccl")

    def all_gather(parts, t, group=None):
        gathered.append((group, [p.device for p in parts], t.device))
        for p in parts:
            p.copy_(t)
    monkeypatch.setattr(tdist, "all_gather", all_gather)
    states = checkpoint.gather_rng_states(torch.device("cpu"), world=2)
    assert len(states) == 2 and torch.equal(states[1]["cpu"], torch.get_rng_state())
    assert gathered and all(g == "gloo-group" and set(ds) == {t} == {torch.device("cpu")} for g, ds, t in gathered)


def test_extraction_ships_uint8_views_normalized_on_the_device(train_spec):
    """Workers sent float32 views through shared memory (616 MB per 128x8 batch): now uint8, 4x fewer bytes,
    and the teacher normalizes them on its device to exactly the float pixels it used to get."""
    from mdcache import extract, sources, teachers, views

    cfg = extract_cfg(train_spec, "unused", views=3)
    p = extract.prepare(cfg)
    stream = extract.ExtractStream(p.shards[:1], p.recipe, 4)
    b = next(iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)))
    assert b.images.dtype == torch.uint8 and b.images.shape == (12, 3, 64, 64)
    sample = next(sources.iter_samples(p.shards[0]))
    image = views.decode_image(sample.data)
    as_float = torch.stack([views.to_tensor(views.replay(image, q, 64), p.teacher.mean, p.teacher.std)
                            for q in views.sample_views(sample.key, image.height, image.width, p.recipe)])
    assert torch.equal(teachers.run_teacher(p.teacher, b.images[:3]), teachers.run_teacher(p.teacher, as_float))


def test_extraction_batches_are_pinned_for_the_copy_to_the_gpu(monkeypatch):
    """pin_memory=True passed a dataclass through untouched (torch pins tensors, containers, and objects with a
    pin_memory method): every batch went to the GPU from pageable memory. Pinning is faked (no GPU here)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from mdcache.extract import Batch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **kw: pinned.append(t) or t.clone())
    views = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    b = pin_memory(Batch("s", keys=["a", "b"], images=views))
    assert isinstance(b, Batch) and pinned == [views] and b.images is not views and torch.equal(b.images, views)
    files = [torch.zeros(5, dtype=torch.uint8), torch.ones(7, dtype=torch.uint8)]  # --replay-on device(-decode)
    b = pin_memory(Batch("s", keys=["a", "b"], images=list(files)))
    assert pinned[1:] == files and all(x is not f for x, f in zip(b.images, files))


def test_a_device_fault_in_the_jpeg_decoder_is_raised_not_decoded_by_pil(monkeypatch, demo_data):
    """A CUDA fault is a RuntimeError too: caught as a refused file's, nvJPEG's failure sent every image to PIL
    quietly (the GPU check's decode rates then timed PIL). A file the decoder refuses still goes to PIL, counted;
    a decoder that refuses every file of a batch is broken, and said so."""
    import io

    import torchvision.io
    from PIL import Image

    from mdcache import sources, views

    datas = [s.data for _, s in zip(range(3), sources.iter_samples(sources.list_source(
        f"{demo_data}/val-000000.tar")[0]))]
    files = [views.encoded_tensor(d) for d in datas]
    real = torchvision.io.decode_jpeg

    def fault(*a, **kw):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(torchvision.io, "decode_jpeg", fault)
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        views.decode_batch(files, torch.device("cpu"))

    def rethrown(*a, **kw):  # torchvision's nvJPEG path rethrows the device's errors as plain RuntimeErrors
        raise RuntimeError("Error while decoding JPEG images: CUDA error: out of memory")
    monkeypatch.setattr(torchvision.io, "decode_jpeg", rethrown)
    refused = []
    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        views.decode_batch(files, torch.device("cpu"), refused=refused)
    assert refused == []  # not blamed on a file

    def refuses_the_second(x, **kw):
        if isinstance(x, list) or torch.equal(x, files[1]):
            raise RuntimeError("nvjpeg: unsupported sampling")
        return real(x, **kw)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses_the_second)
    refused = []
    out = views.decode_batch(files, torch.device("cpu"), refused=refused)
    assert refused == [1] and all(torch.equal(x, views.image_tensor(Image.open(io.BytesIO(d)).convert("RGB")))
                                  for x, d in zip(out, datas))

    def refuses_all(x, **kw):  # a broken decoder (nvJPEG's own status errors are plain RuntimeErrors)
        raise RuntimeError("nvjpegDecode failed: NVJPEG_STATUS_EXECUTION_FAILED")
    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses_all)
    with pytest.raises(RuntimeError, match="refused all 3 JPEGs of a batch.*--replay-on device"):
        views.decode_batch(files, torch.device("cpu"))


def test_normalize_makes_its_constants_once_per_device():
    """mean/std built from Python lists on every call copied them to the GPU on every step."""
    from mdcache import views

    class Made(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Made.n += getattr(func, "__name__", "") == "tensor"
            return func(*args, **(kwargs or {}))
    x = torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    first = views.normalize(x, mean, std)
    with Made():
        again = views.normalize(x, mean, std)
    assert Made.n == 0 and torch.equal(first, again)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(again, expected)


def test_device_state_never_rides_into_loader_workers(tmp_path_factory, train_spec):
    """Calibration tensors cached on the GPU inside the Cache would be pickled into spawned workers."""
    cache = open_cache(shared_cache(tmp_path_factory, train_spec, "int8"))
    cache.calibration_on("cpu")
    assert torch.device("cpu") in cache._calib
    clone = pickle.loads(pickle.dumps(cache))
    assert set(clone._calib) == {"calibration"} and clone.calibration_on("cpu")["mean"].device.type == "cpu"


READS = {"item", "__float__", "__int__", "__bool__", "tolist", "numpy", "nonzero", "masked_select"}


class HostReads(TorchFunctionMode):
    """Every read of a tensor's value on the host (what waits for a GPU) inside a training loop, by the function
    of ours that asked. Left out: the optimizer's own (on a CPU torch's AdamW reads its step counter, on a GPU
    it is fused) and the DataLoader's seed for its workers (a CPU generator, once per epoch)."""

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masked = name == "__getitem__" and len(args) > 1 and getattr(args[1], "dtype", None) == torch.bool
        if name in READS or masked:
            frames = traceback.extract_stack()[:-1]
            in_loop = any(f.name == "train_one_epoch" for f in frames)
            if in_loop and not any("/torch/optim/" in f.filename or "/torch/utils/data/" in f.filename for f in frames):
                ours = [f for f in frames if "/mdtrain/" in f.filename or "/mdcache/" in f.filename]
                self.reads[f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].name}" if ours else "?"] += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_from_the_device_outside_logging_steps(tmp_path_factory, train_spec, tmp_path):
    """Boolean-mask indexing in the objective, `float(loss)` per micro-step, the grad norm and a CPU all-reduce
    per step each made every step wait for the GPU. Now only a logging step reads: the loss and the grad
    norm. 8 steps logged every 4: 4 reads, whatever the number of steps (the GPU check counts real syncs)."""
    from mdtrain.pretrain import PretrainConfig, pretrain

    url = shared_cache(tmp_path_factory, train_spec)
    mode = HostReads()
    with mode:
        pretrain(PretrainConfig(cache=url, out=str(tmp_path / "pt"), student="vit_tiny_patch16_224", batch_size=8,
                                workers=0, epochs=1, warmup_epochs=0, lr=1e-3, progress=False, log_every=4,
                                stop_after=8, shuffle_buffer=8, accum_iter=1))
    assert mode.reads == {"runtime.py:means_over_ranks": 2, "pretrain.py:train_one_epoch": 2}, mode.reads


def test_a_finetune_step_reads_nothing_from_the_device(demo_data, tmp_path):
    """`.item()` between forward and backward, and again for the running sum, made every finetune step wait
    for the GPU. Now the epoch's loss sum is read once, at its end (the full recipe: mixup, cutmix, EMA)."""
    from mdtrain.finetune import FinetuneConfig, finetune

    mode = HostReads()
    with mode:
        finetune(FinetuneConfig(train=f"{demo_data}/train-{{000000..000003}}.tar", val=f"{demo_data}/val-000000.tar",
                                model="vit_tiny_patch16_224", out=str(tmp_path / "ft"), image_size=32, epochs=1,
                                warmup_epochs=0.5, batch_size=16, lr=1e-3, workers=0, log_every=0, model_ema=True))
    assert mode.reads == {"finetune.py:train_one_epoch": 1}, mode.reads


@pytest.mark.slow
def test_the_gpu_check_runs_in_its_tiny_cpu_mode_and_plans_a_dry_run(tmp_path):
    """pipelines/bench/gpu_check.sh is ready for the first GPU: every stage runs here with tiny models, and
    --dry-run writes its plan. One JSON either way."""
    import json
    import subprocess

    from helpers import ROOT

    dry = subprocess.run(["bash", "pipelines/bench/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "dry")],
                         cwd=ROOT, capture_output=True, text=True)
    plan = json.loads((tmp_path / "dry" / "gpu_check.json").read_text())
    assert dry.returncode == 0 and plan["dry_run"] and plan["settings"]["student_batch"] == 256
    assert "would run: tests" in dry.stdout
    if not torch.cuda.is_available():  # the full check without a GPU: why, in the JSON, and exit 2 (not hours on CPU)
        full = subprocess.run(["bash", "pipelines/bench/gpu_check.sh", "--out", str(tmp_path / "full")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        why = json.loads((tmp_path / "full" / "gpu_check.json").read_text())
        assert full.returncode == 2 and "no CUDA device" in why["error"] and "extraction" not in why
    late = subprocess.run(["bash", "pipelines/bench/gpu_check.sh", "--tiny", "--budget-s", "0", "--out",
                           str(tmp_path / "late")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    skipped = json.loads((tmp_path / "late" / "gpu_check.json").read_text())
    assert late.returncode == 0 and all("past --budget-s" in skipped[x]["skipped"] for x in skipped["stages"])
    # A stage that runs past the budget is stopped inside (not only between stages), the rest is skipped.
    cut = subprocess.run(["bash", "pipelines/bench/gpu_check.sh", "--tiny", "--budget-s", "2", "--stages",
                          "extraction,codecs", "--out", str(tmp_path / "late")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    r = json.loads((tmp_path / "late" / "gpu_check.json").read_text())
    assert cut.returncode != 0 and r["failed_stages"] == ["extraction"] and r["seconds"]["extraction"] < 30
    assert "ran past --budget-s" in r["extraction"]["error"] and "past --budget-s" in r["codecs"]["skipped"]
    p = subprocess.run(["bash", "pipelines/bench/gpu_check.sh", "--tiny", "--out", str(tmp_path / "tiny")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "tiny" / "gpu_check.json").read_text())
    for where in ("workers", "device", "device-decode"):
        e = r["extraction"][f"replay_on_{where}"]
        assert e["extract_views_per_s"] > 0 and e["teacher_only_views_per_s"] > 0
    t = r["training"]["tiny"]
    assert t["cached_step_ips"] > 0 and t["online_memory_ips"] > 0 and t["loader_images_per_core"] > 0
    assert t["device_decode"]["cached_step_ips"] > 0 and t["device_decode"]["loader_images_per_core"] > 0
    assert r["syncs"]["syncs_per_step_outside_logging_steps"] == 0
    assert all(c["decode_max_abs_diff"] == 0 for c in r["codecs"].values())  # CPU vs CPU: identical
    assert r["replay"]["max_level_difference"] == 0 and set(r["seconds"]) == set(r["stages"])
    d = r["decode"]  # torchvision's CPU decoder is PIL's libjpeg-turbo: the same pixels
    assert d["max_level_difference"] == 0 and d["decode_images_per_s"] > 0 and d["images"] > 0
    assert d["refused_by_the_device_decoder"] == 0 and r["failed_stages"] == [] and "machine" in r
    # A second run in the same folder starts afresh (the bench refuses a root with committed shards).
    again = subprocess.run(["bash", "pipelines/bench/gpu_check.sh", "--tiny", "--stages", "extraction,syncs",
                            "--out", str(tmp_path / "tiny")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    r2 = json.loads((tmp_path / "tiny" / "gpu_check.json").read_text())
    assert again.returncode == 0 and r2["stages"] == ["extraction", "syncs"] and "training" not in r2, again.stderr
    assert r2["syncs"]["syncs_per_step_outside_logging_steps"] == 0
