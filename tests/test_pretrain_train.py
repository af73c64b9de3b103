"""`mdtrain pretrain` end to end, as users run it: real caches, real timm students, real torchrun."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, STUDENT, TINY_TEACHER, TRAIN_FLAGS, mdtrain, read_jsonl, shared_cache, wandb_history

from mdtrain.checkpoint import load_trainer_state, weights_metadata


def load_ckpt(path) -> dict:
    return load_trainer_state(str(path), "pretrain")


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory, train_spec):
    return shared_cache(tmp_path_factory, train_spec)


# Runs the real CLI and, at exit, reports which teacher-side modules the process ever imported.
PROBE = ("import atexit, json, sys\n"
         "atexit.register(lambda: print('MODULES=' + json.dumps(sorted(m for m in sys.modules "
         "if m.split('.')[0] == 'open_clip' or m == 'mdcache.teachers'))))\n"
         "from mdtrain.cli import app\n"
         "app(prog_name='mdtrain')\n")


def test_offline_loss_decreases_outputs_load_and_no_teacher_is_imported(cache_url, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", PROBE, "pretrain", "--cache", cache_url, "--out", str(out),
                        "--epochs", "3", "--drop-path", "0", "--log", "tensorboard", "--log", "wandb", *TRAIN_FLAGS],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr
    modules = json.loads(p.stdout.split("MODULES=")[1].splitlines()[0])
    assert modules == [], f"offline pretraining imported the teacher side: {modules}"

    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 42 and [r["step"] for r in rows] == list(range(1, 43))  # 3 epochs x 14 batches
    assert all(set(r) >= {"step", "epoch", "loss", "lr", "images_per_s"} for r in rows)
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert rows[0]["lr"] > rows[-1]["lr"] and math.isclose(rows[-1]["lr"], 1e-5, rel_tol=1e-6)  # cosine to min_lr
    assert (out / "loss.png").stat().st_size > 1000
    # --log tensorboard: the same rows, read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"loss", "lr", "images_per_s"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 43))
    assert all(math.isclose(e.value, r["loss"], rel_tol=1e-6) for e, r in zip(loss, rows))
    # --log wandb, offline (no network): the same rows, read back from the run's own file
    history = [h for h in wandb_history(out) if "loss" in h]
    assert [h["_step"] for h in history] == list(range(1, 43))
    assert all(math.isclose(h["loss"], r["loss"], rel_tol=1e-6) for h, r in zip(history, rows))
    bad = mdtrain("pretrain", "--cache", cache_url, "--out", str(tmp_path / "bad"), "--log", "mlflow", *TRAIN_FLAGS,
                  check=False)
    assert bad.returncode == 2 and "--log 'mlflow': choose from tensorboard, wandb" in bad.stderr

    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert (ckpt["kind"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == ("pretrain", 3, 0, 42)
    assert {"model", "optimizer", "scheduler", "rng"} <= set(ckpt) and ckpt["config"]["student"] == STUDENT
    # What finetune/eval/knn need to rebuild the student, in the weights file itself.
    meta = weights_metadata(str(out / "student.safetensors"))
    assert (meta["model"], meta["image_size"], meta["kind"], meta["step"]) == (STUDENT, "64", "pretrain-student", "42")
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and json.loads(meta["std"]) == [0.229, 0.224, 0.225]
    assert meta["cache_id"] == cache_url.rstrip("/").rsplit("/", 1)[-1] and meta["layer_scale"] == "0.1"

    import timm
    from safetensors.torch import load_file

    weights = load_file(out / "student.safetensors")
    model = timm.create_model(STUDENT, img_size=64, init_values=0.1)  # LayerScale 0.1: the recipe's default
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    assert torch.equal(model.blocks[0].attn.qkv.weight, ckpt["model"]["backbone.blocks.0.attn.qkv.weight"])
    # The usual timm path (pretrained file + a new classifier + position embeddings resampled to 224 px).
    ft = timm.create_model(STUDENT, pretrained=True, pretrained_cfg_overlay={"file": str(out / "student.safetensors")},
                           num_classes=10, init_values=0.1)
    assert torch.equal(ft.blocks[0].mlp.fc1.weight, weights["blocks.0.mlp.fc1.weight"]) and ft.pos_embed.shape[1] == 197


EXACT = ["--deterministic", "--precision", "fp32"]  # bitwise equal on a GPU too (`pytest -m cuda` there)


@pytest.mark.cuda
@pytest.mark.slow
def test_resume_mid_epoch_reproduces_order_and_weights(cache_url, tmp_path):
    flags = ["--cache", cache_url, "--epochs", "2", "--warmup-epochs", "1", "--log-samples", *TRAIN_FLAGS, *EXACT]
    mdtrain("pretrain", *flags, "--out", str(tmp_path / "full"))
    mdtrain("pretrain", *flags, "--out", str(tmp_path / "cut"), "--stop-after", "5")  # odd position, drop path on
    ck = load_ckpt(tmp_path / "cut" / "last.ckpt")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["step"]) == (0, 5, 5)
    mdtrain("pretrain", *flags, "--out", str(tmp_path / "cut"), "--resume", "auto")

    def keys(run):
        return [r["keys"] for r in read_jsonl(tmp_path / run / "samples-rank0.jsonl")]
    assert len(keys("full")) == 28 and keys("cut") == keys("full")
    assert [r["loss"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == \
           [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    a = load_ckpt(tmp_path / "full" / "last.ckpt")["model"]
    b = load_ckpt(tmp_path / "cut" / "last.ckpt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A different data layout cannot resume exactly: refused with the reason.
    p = mdtrain("pretrain", *flags, "--out", str(tmp_path / "cut"), "--resume", "auto", "--workers", "1", check=False)
    assert p.returncode == 2 and "lanes: checkpoint 2 vs now 1" in p.stderr


@pytest.mark.cuda
def test_online_teacher_matches_offline_fp16_cache(cache_url, tmp_path, train_spec):
    flags = ["--epochs", "1", "--stop-after", "6", *TRAIN_FLAGS, *EXACT]
    mdtrain("pretrain", "--cache", cache_url, "--out", str(tmp_path / "off"), *flags)
    # Online, no cache: the teacher runs on views sampled exactly as `mdcache extract` sampled them.
    mdtrain("pretrain", "--teacher", TINY_TEACHER, "--random-init", "--source", train_spec, "--image-size", "64",
            "--views", "2", "--out", str(tmp_path / "on"), *flags)
    off = [r["loss"] for r in read_jsonl(tmp_path / "off" / "metrics.jsonl")]
    on = [r["loss"] for r in read_jsonl(tmp_path / "on" / "metrics.jsonl")]
    assert len(off) == len(on) == 6
    assert off != on  # really two computations (fp16 targets vs fp32 teacher) ...
    for a, b in zip(off, on):  # ... equal to within fp16 rounding of the targets
        assert abs(a - b) <= 2e-3 * abs(b), (off, on)
    assert abs(off[0] - on[0]) <= 2e-4 * on[0]
    config = json.loads((tmp_path / "on" / "config.json").read_text())
    assert config["mode"] == "online"


@pytest.mark.ddp
@pytest.mark.slow
def test_two_process_torchrun_ranks_see_disjoint_data(cache_url, tmp_path):
    out = tmp_path / "ddp"
    mdtrain("pretrain", "--cache", cache_url, "--out", str(out), "--epochs", "2", "--log-samples",
            *TRAIN_FLAGS, "--batch-size", "4", "--workers", "1", torchrun=2)
    r0, r1 = read_jsonl(out / "samples-rank0.jsonl"), read_jsonl(out / "samples-rank1.jsonl")
    assert len(r0) == len(r1) == 30  # 15 steps per epoch on each rank, in lockstep
    for epoch in (0, 1):
        k0 = [k for r in r0 if r["epoch"] == epoch for k in r["keys"]]
        k1 = [k for r in r1 if r["epoch"] == epoch for k in r["keys"]]
        assert len(set(k0)) == len(k0) == 60 and len(set(k1)) == 60
        assert not set(k0) & set(k1)
        assert all(len(r["views"]) == 4 for r in r0 + r1)
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 30 and all(math.isfinite(r["loss"]) for r in rows)
    ckpt = load_ckpt(out / "last.ckpt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 30
    assert not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])  # per-rank drop-path noise


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(cache_url, tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "mdtrain", "pretrain", "--cache", cache_url, "--out", str(out), "--epochs", "500",
           *TRAIN_FLAGS]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists() or \
                len(read_jsonl(out / "metrics.jsonl")) < 3:
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "saving a checkpoint" in err
    ck = load_ckpt(out / "last.ckpt")
    assert ck["step"] >= 3 and ck["step"] == len(read_jsonl(out / "metrics.jsonl"))
    mdtrain("pretrain", *cmd[4:], "--resume", "auto", "--stop-after", "1")
    assert load_ckpt(out / "last.ckpt")["step"] == ck["step"] + 1
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, ck["step"] + 2))


def test_clear_errors_for_wrong_grid_and_incomplete_cache(cache_url, tmp_path):
    p = mdtrain("pretrain", "--cache", cache_url, "--out", str(tmp_path / "g"), "--student", "vit_small_patch8_224",
                "--batch-size", "8", check=False)
    assert p.returncode == 2 and "8x8 patch grid" in p.stderr and "4x4 grid" in p.stderr
    p = mdtrain("pretrain", "--cache", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n"), check=False)
    assert p.returncode == 2 and "not a cache directory" in p.stderr


def test_checkpoints_at_save_every_and_at_each_epoch_end(cache_url, tmp_path, one_torch_thread):
    """In-process (the Python API): which checkpoint exists when each step is logged."""
    from mdtrain.pretrain import PretrainConfig, pretrain

    out = tmp_path / "ck"
    seen = {}

    def on_step(row):
        path = out / "last.ckpt"
        seen[row["step"]] = load_ckpt(path)["step"] if path.exists() else None

    cfg = PretrainConfig(cache=cache_url, out=str(out), student=STUDENT, epochs=2, batch_size=8, warmup_epochs=0,
                         lr=1e-3, workers=0, shuffle_buffer=8, progress=False, save_every=4, stop_after=17, log_every=1)
    summary = pretrain(cfg, on_step=on_step)  # 15 steps per epoch with one lane
    assert summary["stopped"] and (summary["epoch"], summary["batch_in_epoch"], summary["step"]) == (1, 2, 17)
    assert [seen[s] for s in range(1, 18)] == [None] * 4 + [4] * 4 + [8] * 4 + [12] * 3 + [15, 16]
    ck = load_ckpt(out / "last.ckpt")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["step"]) == (1, 2, 17)


def test_the_console_prints_each_logged_step_with_the_mean_since_the_last(cache_url, tmp_path):
    """`--log-every 4` printed every 50 steps and one batch's loss: now a line per logged step, and its loss is the
    mean of the steps since the previous line (summed on the device, read once): the same run logged every
    step gives the same mean."""
    from helpers import invoke

    flags = ["--cache", cache_url, *TRAIN_FLAGS, "--workers", "0", "--epochs", "1", "--stop-after", "8"]
    every = invoke("pretrain", *flags, "--out", tmp_path / "every", module="mdtrain")
    four = invoke("pretrain", *flags, "--log-every", "4", "--out", tmp_path / "four", module="mdtrain")
    assert every.exit_code == four.exit_code == 0, four.stderr
    losses = [r["loss"] for r in read_jsonl(tmp_path / "every" / "metrics.jsonl")]
    rows = read_jsonl(tmp_path / "four" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 8] and [r["mean_steps"] for r in rows] == [4, 4]
    for row, chunk in zip(rows, (losses[:4], losses[4:])):
        assert abs(row["loss_mean"] - sum(chunk) / 4) < 1e-5 and row["loss"] == pytest.approx(chunk[-1], rel=1e-6)
    lines = [line for line in four.stderr.splitlines() if re.match(r"pretrain \d+/\d+ steps ", line)]
    assert len(lines) == 2 and all("(mean of 4 steps)" in line and "data wait" in line for line in lines), four.stderr
