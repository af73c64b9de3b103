"""mdtrain finetune on real images (the demo photo set) with a tiny timm ViT (random init, no downloads)."""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import timm
import torch
from helpers import mdtrain, read_jsonl

from mdcache.errors import ConfigError
from mdtrain.checkpoint import CheckpointError, load_trainer_state, save_weights
from mdtrain.classifier import InitError, build_model, layer_scale_of, load_backbone
from mdtrain.finetune import FinetuneConfig, build_recipe, finetune, max_lr, resolve_lr, resolve_model
from mdtrain.runtime import seed_all

MODEL = "vit_tiny_patch16_224"
SIZE = 32  # 2x2 patches: a real ViT, fast enough on 2 CPU cores
CPU1 = {"OMP_NUM_THREADS": "1"}


def backbone(path: str, name: str = MODEL, size: int = SIZE, seed: int = 0, **kw) -> dict:
    """A pretrained-student stand-in: a timm backbone without classifier, written as the trainer writes weights."""
    torch.manual_seed(seed)
    sd = timm.create_model(name, pretrained=False, img_size=size, num_classes=0, **kw).state_dict()
    save_weights(path, sd, {"model": name, "image_size": size, "kind": "pretrain-student"})
    return sd


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(demo_data) -> str:
    return str(demo_data)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("student") / "student.safetensors")
    backbone(path)
    return path


def cfg(data: str, out: str, **kw) -> FinetuneConfig:
    base = dict(train=f"{data}/train-{{000000..000003}}.tar", val=f"{data}/val-000000.tar", model=MODEL, out=out,
                image_size=SIZE, epochs=6, warmup_epochs=1, batch_size=16, lr=1e-3, workers=0, log_every=0)
    return FinetuneConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- loading the backbone

def test_load_backbone_takes_every_student_tensor_and_only_the_classifier_is_new(student):
    sd = safetensors.torch.load_file(student)
    model = build_model(MODEL, 10, SIZE, drop_path=0.1)
    report = load_backbone(model, student)
    assert sorted(report["missing"]) == ["head.bias", "head.weight"]
    assert report["unexpected"] == [] and report["loaded"] == len(sd)
    got = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert got["head.weight"].shape == (10, 192)


def test_layer_scale_students_load_into_a_layer_scale_model(tmp_path):
    """`mdtrain pretrain --layer-scale 0.1` (the paper's ViT-B setting) makes ls1/ls2 gammas: finetune and
    eval must build the model with LayerScale, or the backbone would not load."""
    path = str(tmp_path / "ls.safetensors")
    sd = backbone(path, init_values=0.1)
    plain = str(tmp_path / "plain.safetensors")
    backbone(plain)
    assert layer_scale_of(path) and layer_scale_of(plain) is None
    with pytest.raises(InitError):
        load_backbone(build_model(MODEL, 10, SIZE), path)
    model = build_model(MODEL, 10, SIZE, layer_scale=layer_scale_of(path))
    report = load_backbone(model, path)
    assert sorted(report["missing"]) == ["head.bias", "head.weight"]
    assert torch.equal(model.state_dict()["blocks.3.ls1.gamma"], sd["blocks.3.ls1.gamma"])


def test_load_backbone_adapts_pos_embed_and_avg_pool(student):
    sd = safetensors.torch.load_file(student)
    model = build_model(MODEL, 5, 64, global_pool="avg")
    report = load_backbone(model, student)
    assert any("resampled pos_embed" in n for n in report["notes"])
    assert any("fc_norm" in n for n in report["notes"])
    got = model.state_dict()
    assert got["pos_embed"].shape == (1, 17, 192)
    assert torch.equal(got["fc_norm.weight"], sd["norm.weight"])
    assert torch.equal(got["blocks.11.mlp.fc2.weight"], sd["blocks.11.mlp.fc2.weight"])


def test_incompatible_backbone_is_refused_with_a_clear_error(tmp_path, student):
    small = str(tmp_path / "vit_small.safetensors")
    backbone(small, "vit_small_patch16_224")
    with pytest.raises(InitError) as e:
        load_backbone(build_model(MODEL, 10, SIZE), small)
    msg = str(e.value)
    assert small in msg and "another shape" in msg
    assert "patch_embed.proj.weight: checkpoint (384, 3, 16, 16) vs model (192, 3, 16, 16)" in msg

    sd = safetensors.torch.load_file(student)
    truncated = str(tmp_path / "no_last_block.safetensors")
    safetensors.torch.save_file({k: v for k, v in sd.items() if not k.startswith("blocks.11.")}, truncated)
    with pytest.raises(InitError, match=r"backbone tensor\(s\) missing: blocks\.11\."):
        load_backbone(build_model(MODEL, 10, SIZE), truncated)

    renamed = str(tmp_path / "prefixed.safetensors")
    safetensors.torch.save_file({f"encoder.{k}": v for k, v in sd.items()}, renamed)
    with pytest.raises(InitError, match="unexpected tensor"):
        load_backbone(build_model(MODEL, 10, SIZE), renamed)


def test_cli_finetune_refuses_incompatible_init(tmp_path, data):
    small = str(tmp_path / "vit_small.safetensors")
    backbone(small, "vit_small_patch16_224")
    r = mdtrain("finetune", "--model", MODEL, "--image-size", str(SIZE), "--init", small,
                "--train", f"{data}/train-000000.tar", "--val", f"{data}/val-000000.tar",
                "--out", str(tmp_path / "ft"), "--epochs", "1", "--workers", "0", check=False, env=CPU1)
    assert r.returncode == 2, r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
    assert "does not fit" in r.stderr and "vit_small.safetensors" in r.stderr
    assert not os.path.exists(tmp_path / "ft" / "last.ckpt")


# ----------------------------------------------------------------------------- the recipe's defaults

def test_recipe_defaults_are_beit_v2s(tmp_path, data, student):
    """What finetune resolves, without training: lr 5e-4 at an effective batch of 1024 and linear in the
    batch, mean pooling, a head on a pretrained backbone initialized at 0.001x timm's init (from scratch:
    timm's init, or the new backbone gets no gradient), and a cosine that starts at the peak right after
    warmup (no drop) and reaches --min-lr at the last epoch."""
    assert resolve_lr(FinetuneConfig(batch_size=1024), world=1) == pytest.approx(5e-4)
    assert resolve_lr(FinetuneConfig(batch_size=128), world=8) == pytest.approx(5e-4)
    assert resolve_lr(FinetuneConfig(batch_size=128), world=1) == pytest.approx(5e-4 / 8)
    assert resolve_lr(FinetuneConfig(batch_size=128, lr=3e-3), world=8) == 3e-3  # --lr is absolute

    out = str(tmp_path / "ft")
    finetune(cfg(data, out, lr=None, stop_after=0, init=student))  # defaults but the tiny model; batch 16
    resolved = json.load(open(os.path.join(out, "config.json")))["resolved"]
    assert resolved["lr"] == pytest.approx(5e-4 * 16 / 1024) and resolved["effective_batch"] == 16
    assert resolved["global_pool"] == "avg"
    start = load_trainer_state(os.path.join(out, "last.ckpt"), "finetune")["model"]
    assert "fc_norm.weight" in start and "norm.weight" not in start  # timm's avg pooling layout
    seed_all(0)
    timm_head = timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=10, global_pool="avg",
                                  drop_path_rate=0.1).head.weight.detach()
    assert torch.allclose(start["head.weight"], 0.001 * timm_head)
    assert start["head.weight"].abs().max() < 1e-3 < timm_head.abs().max()
    finetune(cfg(data, str(tmp_path / "scratch"), stop_after=0))
    assert torch.equal(load_trainer_state(str(tmp_path / "scratch" / "last.ckpt"), "finetune")["model"]["head.weight"],
                       timm_head)
    assert build_recipe(cfg(data, out, epochs=10, warmup_epochs=None), build_model(MODEL, 10, SIZE), 10,
                        1).scheduler.warmup_t == 2  # a short run warms up for a fifth of it

    c = cfg(data, out, epochs=6, warmup_epochs=2)  # peak lr 1e-3
    r = build_recipe(c, build_model(MODEL, 10, SIZE, global_pool="avg"), 10, world=1)
    lrs = {}
    for t in (0, 1.9, 2, 4, 6):
        r.scheduler.step(t)
        lrs[t] = max_lr(r.optimizer)  # the head's group: layer decay scales the others down
    assert lrs[0] == pytest.approx(c.warmup_lr) and lrs[1.9] < lrs[2]
    assert lrs[2] == pytest.approx(1e-3)  # the peak at the end of warmup, not 0.75x of it
    assert lrs[4] == pytest.approx(c.min_lr + (1e-3 - c.min_lr) / 2)  # half way through the cosine
    assert lrs[6] == pytest.approx(c.min_lr)
    with pytest.raises(ConfigError, match="--warmup-epochs"):
        build_recipe(cfg(data, out, epochs=2, warmup_epochs=2), build_model(MODEL, 10, SIZE), 10, world=1)


def test_init_brings_its_model_name_arguments_and_size(tmp_path, data):
    """--init of a student that records its model (as pretrain's student.safetensors does): finetune needs no
    --model, --model-arg or --image-size, as knn and linprobe; explicit options still win."""
    path = str(tmp_path / "student.safetensors")
    sd = timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=0, embed_dim=48, depth=2,
                           num_heads=2).state_dict()
    save_weights(path, sd, {"model": MODEL, "image_size": SIZE, "kind": "pretrain-student",
                            "model_args": json.dumps({"embed_dim": 48, "depth": 2, "num_heads": 2})})
    finetune(cfg(data, str(tmp_path / "ft"), model=None, image_size=None, init=path, stop_after=0))
    used = json.load(open(tmp_path / "ft" / "config.json"))
    assert (used["model"], used["image_size"]) == (MODEL, SIZE)
    assert used["model_args"] == {"embed_dim": 48, "depth": 2, "num_heads": 2}
    other = resolve_model(cfg(data, "x", model="vit_small_patch16_224", image_size=None, init=path))
    assert other.model_args == {} and other.image_size == SIZE  # another model: the record's arguments do not fit it
    assert resolve_model(cfg(data, "x", model=None, image_size=None)).model == "vit_base_patch16_224"


def test_a_one_epoch_cosine_decays_without_timm_saying_it_will_not(tmp_path, data, caplog):
    """timm warns "Cosine annealing scheduler will have no effect" when the cosine spans one epoch; we step it
    in fractional epochs, so the lr does decay and the warning would mislead."""
    r = build_recipe(cfg(data, str(tmp_path), epochs=2, warmup_epochs=1), build_model(MODEL, 10, SIZE), 10, world=1)
    assert "no effect" not in caplog.text
    lrs = []
    for t in (1.0, 1.5, 2.0):
        r.scheduler.step(t)
        lrs.append(max_lr(r.optimizer))
    assert lrs[0] > lrs[1] > lrs[2]


# ----------------------------------------------------------------------------- training

@pytest.mark.cuda
def test_finetune_from_student_beats_chance_with_the_full_recipe(tmp_path, data, student):
    """BEiT v2 recipe (mixup, cutmix, smoothing, RandAugment, erasing, layer decay, drop path, EMA)
    on 10 separable classes: chance is 10%."""
    out = str(tmp_path / "ft")
    r = finetune(cfg(data, out, init=student, model_ema=True, model_ema_decay=0.9))
    assert r["num_classes"] == 10  # inferred from the .cls labels
    assert r["best_top1"] >= 40.0, r
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [x["epoch"] for x in rows] == list(range(6))
    for x in rows:
        assert {"train_loss", "lr", "val_top1", "val_top5", "ema_top1"} <= set(x)
        assert x["val_n"] == 40
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["lr"] < max(x["lr"] for x in rows)  # cosine decay after warmup
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Checkpoints: weights timm loads as-is, trainer state without pickled objects.
    best = safetensors.torch.load_file(os.path.join(out, "best.safetensors"))
    m = timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=10, global_pool="avg")
    m.load_state_dict(best)
    state = load_trainer_state(os.path.join(out, "last.ckpt"), "finetune")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (6, 0, 42)  # 6 epochs x 7 batches
    assert {"model", "optimizer", "scheduler", "ema", "best"} <= set(state)
    best_meta = torch.load(os.path.join(out, "best.ckpt"), weights_only=True)
    assert best_meta["metrics"]["val_top1"] == r["best_top1"]
    assert os.path.exists(os.path.join(out, "ema.safetensors"))


def test_from_scratch_baseline_is_the_same_command_without_init(tmp_path, data):
    """Without --init the run starts from timm's own init for --seed (nothing loaded, the head too: a head
    scaled to near zero would starve the new backbone of gradient) and learns."""
    out = str(tmp_path / "scratch")
    kw = dict(epochs=2, warmup_epochs=0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0, smoothing=0.0)
    r = finetune(cfg(data, out, stop_after=0, **kw))  # a checkpoint of the initial state, no step taken
    assert r["step"] == 0 and json.load(open(os.path.join(out, "config.json")))["init"] is None
    seed_all(0)
    fresh = build_model(MODEL, 10, SIZE, drop_path=0.1, global_pool="avg").state_dict()
    start = load_trainer_state(os.path.join(out, "last.ckpt"), "finetune")["model"]
    assert start.keys() == fresh.keys() and all(torch.equal(start[k], fresh[k]) for k in fresh)
    finetune(cfg(data, out, resume="auto", **kw))
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [x["epoch"] for x in rows] == [0, 1] and rows[1]["train_loss"] < rows[0]["train_loss"], rows
    assert all(0 <= x["data_wait"] <= 1 for x in rows)  # the share of the epoch spent waiting for the loader


@pytest.fixture()
def deterministic_undone():
    """--deterministic sets process-wide torch flags: put them back for the tests that follow."""
    yield
    torch.use_deterministic_algorithms(False)
    for enable in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                   torch.backends.cuda.enable_cudnn_sdp):
        enable(True)


@pytest.mark.cuda
def test_resume_mid_epoch_is_exact(tmp_path, data, student, deterministic_undone):
    """3 epochs in one go == stop after 10 optimizer steps (mid epoch 1), then --resume auto: same
    weights, EMA and metrics. Mixup, RandAugment, erasing, drop path, EMA and 2 loader workers all draw
    random numbers. --deterministic and fp32: bitwise on a GPU too (`pytest -m cuda` there)."""
    kw = dict(init=student, epochs=3, workers=2, model_ema=True, model_ema_decay=0.9, deterministic=True,
              precision="fp32")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    total = finetune(cfg(data, a, **kw))["step"]
    per_epoch = read_jsonl(os.path.join(a, "metrics.jsonl"))[0]["steps"]  # 2 workers x 2 shards: 3 batches each
    assert (per_epoch, total) == (6, 18)
    assert finetune(cfg(data, b, stop_after=10, **kw))["step"] == 10
    ck = load_trainer_state(os.path.join(b, "last.ckpt"), "finetune")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["step"]) == (1, 4, 10)
    assert [x["epoch"] for x in read_jsonl(os.path.join(b, "metrics.jsonl"))] == [0]
    assert finetune(cfg(data, b, resume="auto", **kw))["step"] == total
    wa = safetensors.torch.load_file(os.path.join(a, "last.safetensors"))
    wb = safetensors.torch.load_file(os.path.join(b, "last.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = safetensors.torch.load_file(os.path.join(a, "ema.safetensors"))
    eb = safetensors.torch.load_file(os.path.join(b, "ema.safetensors"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("train_seconds", "data_wait")}  # noqa: E731
    ra, rb = read_jsonl(os.path.join(a, "metrics.jsonl")), read_jsonl(os.path.join(b, "metrics.jsonl"))
    assert len(ra) == 3 and [strip(x) for x in ra] == [strip(x) for x in rb]


def test_resume_refuses_a_changed_recipe(tmp_path, data):
    out = str(tmp_path / "ft")
    finetune(cfg(data, out, epochs=2, stop_after=3))
    with pytest.raises(CheckpointError, match="batch_size"):
        finetune(cfg(data, out, epochs=2, batch_size=8, resume="auto"))


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_torchrun_two_processes_gloo(tmp_path, data, student):
    """Real torchrun, 2 CPU processes: 4 train shards split by rank, 1 val shard split by sample;
    every val image is counted once and the DDP val top-1 equals a single-process `mdtrain eval`."""
    out = str(tmp_path / "ddp")
    mdtrain("finetune", "--model", MODEL, "--image-size", str(SIZE), "--init", student,
            "--train", f"{data}/train-{{000000..000003}}.tar", "--val", f"{data}/val-000000.tar",
            "--out", out, "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "8", "--lr", "1e-3",
            "--workers", "0", "--precision", "fp32", "--log-every", "0", torchrun=2, env=CPU1)
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 2 and all(x["val_n"] == 40 for x in rows)
    assert json.load(open(os.path.join(out, "config.json")))["resolved"]["world"] == 2
    assert rows[-1]["images"] == 112  # 2 ranks x 2 shards x 30 images, batches of 8 with drop_last
    e = mdtrain("eval", "--weights", os.path.join(out, "last.safetensors"), "--val", f"{data}/val-000000.tar",
                "--precision", "fp32", "--workers", "0", env=CPU1)
    single = json.loads(e.stdout.strip().splitlines()[-1])
    assert single["n"] == 40
    assert abs(single["top1"] - rows[-1]["val_top1"]) <= 2.5  # at most one borderline image of 40
