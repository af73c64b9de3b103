"""The FFCV path: ffcv-build from real tar shards, --loader ffcv training, the loader benchmark, and
the clear message (with the default loader still working) where FFCV is not installed.

FFCV is installed in the project's environment, so these tests never skip: a missing FFCV fails them."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from mdtrain import labelled
from mdtrain.checkpoint import load_trainer_state, save_weights
from mdtrain.ffcv_loader import BenchLoaderConfig, FfcvBuildConfig, bench_loader, beton_info, build_beton
from mdtrain.finetune import FinetuneConfig, finetune

MODEL, SIZE = "vit_tiny_patch16_224", 32
pytestmark = [pytest.mark.ffcv, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def data(demo_data) -> str:
    return str(demo_data)


@pytest.fixture(scope="module")
def betons(data, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("beton")
    out = {}
    for name, spec in (("train", f"{data}/train-{{000000..000003}}.tar"), ("val", f"{data}/val-000000.tar")):
        out[name] = str(d / f"{name}.beton")
        build_beton(FfcvBuildConfig(source=spec, out=out[name], max_resolution=64, workers=2))
    return out


def tar_labels(path: str) -> list[int]:
    with tarfile.open(path) as tf:
        return [int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls")]


def test_ffcv_build_keeps_every_image_and_label_in_order(data, betons, tmp_path):
    want = [y for i in range(4) for y in tar_labels(f"{data}/train-{i:06d}.tar")]
    info = beton_info(betons["train"])
    assert info["samples"] == 120 and info["num_classes"] == 10
    assert info["labels"].tolist() == want
    side = json.load(open(betons["train"] + ".json"))
    assert side["samples"] == 120 and side["max_resolution"] == 64
    # Pixels: a raw-mode beton at full resolution holds exactly what PIL decodes.
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    raw = str(tmp_path / "raw.beton")
    build_beton(FfcvBuildConfig(source=f"{data}/val-000000.tar", out=raw, write_mode="raw", max_resolution=0,
                                workers=1))
    loader = Loader(raw, batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images = np.concatenate([np.array(x, copy=True) for x, _ in loader])
    with tarfile.open(f"{data}/val-000000.tar") as tf:
        ref = [np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
               for m in tf if m.name.endswith(".jpg")]
    assert images.shape == (40, 256, 256, 3)
    assert all(np.array_equal(a, b) for a, b in zip(images, ref))


def test_ffcv_build_names_an_undecodable_image(tmp_path, data):
    with tarfile.open(f"{data}/val-000000.tar") as src, tarfile.open(tmp_path / "bad-000000.tar", "w") as dst:
        for m in list(src)[:4]:
            dst.addfile(m, src.extractfile(m))
        for name, payload in (("broken.jpg", b"\xff\xd8 nope"), ("broken.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            dst.addfile(info, io.BytesIO(payload))
    out = str(tmp_path / "bad.beton")
    with pytest.raises(Exception, match=r"(?s)1 undecodable image.*bad-000000\.tar: 'broken'") as e:
        build_beton(FfcvBuildConfig(source=str(tmp_path / "bad-000000.tar"), out=out, workers=1))
    assert type(e.value).__name__ == "SourceError"
    assert not os.path.exists(out)


@pytest.mark.slow
def test_ffcv_and_default_loaders_train_the_same_model(tmp_path, data, betons):
    """Same recipe, same data, same init: both loaders start from the same model (equal tensors at step 0),
    see the same number of images per epoch, and both beat chance (10%) on the validation images; the
    FFCV-trained weights score as well when the default loader reads the images."""
    import timm

    student = str(tmp_path / "student.safetensors")
    torch.manual_seed(0)
    save_weights(student, timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=0).state_dict(),
                 {"model": MODEL, "image_size": SIZE})
    common = dict(model=MODEL, init=student, image_size=SIZE, epochs=5, warmup_epochs=1, batch_size=16,
                  lr=1e-3, log_every=0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0)
    # One FFCV thread: on 2 cores more threads only fight torch's own (measured 2x slower).
    runs = {"ffcv": dict(train=betons["train"], val=betons["val"], loader="ffcv", workers=1),
            "default": dict(train=f"{data}/train-{{000000..000003}}.tar", val=f"{data}/val-000000.tar", workers=0)}
    start = {}
    for name, kw in runs.items():  # step 0 (a checkpoint, no step taken), then the training, resumed from it
        finetune(FinetuneConfig(out=str(tmp_path / name), stop_after=0, **common, **kw))
        start[name] = load_trainer_state(str(tmp_path / name / "last.ckpt"), "finetune")["model"]
    assert start["ffcv"].keys() == start["default"].keys()
    assert all(torch.equal(start["ffcv"][k], start["default"][k]) for k in start["ffcv"])
    r = {name: finetune(FinetuneConfig(out=str(tmp_path / name), resume="auto", **common, **kw))
         for name, kw in runs.items()}
    assert r["ffcv"]["num_classes"] == r["default"]["num_classes"] == 10
    assert r["ffcv"]["best_top1"] >= 40 and r["default"]["best_top1"] >= 40, r
    rows = [json.loads(x) for x in open(tmp_path / "ffcv" / "metrics.jsonl")]
    rows_default = [json.loads(x) for x in open(tmp_path / "default" / "metrics.jsonl")]
    assert len(rows) == 5 and all(x["val_n"] == 40 for x in rows) and rows[0]["images"] == 112
    assert [x["images"] for x in rows] == [x["images"] for x in rows_default]
    # The FFCV-trained classifier, evaluated by the default (PIL) loader, is as good as FFCV said.
    from mdtrain.evaluate import EvalConfig, evaluate

    e = evaluate(EvalConfig(weights=str(tmp_path / "ffcv" / "last.safetensors"), val=f"{data}/val-000000.tar",
                            workers=0))
    assert e["top1"] >= 40 and abs(e["top1"] - rows[-1]["val_top1"]) <= 15


def test_ffcv_and_default_loaders_deliver_every_image_once_per_epoch(data, betons):
    """Per epoch, the FFCV loader (reshuffled) and the default loader deliver the same labels, each image
    once: the multiset of labels equals the tar files' labels."""
    want = Counter(y for i in range(4) for y in tar_labels(f"{data}/train-{i:06d}.tar"))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    ffcv = labelled.ffcv_train_split(betons["train"], 16, SIZE, (0.08, 1.0), mean, std, 1, 0, 1, torch.device("cpu"),
                                     drop_last=False)
    default = labelled.default_split(f"{data}/train-{{000000..000003}}.tar",
                                     labelled.eval_transform(SIZE, 1.0, mean, std), 16, 0, False, 0, None, None, 0, {})
    orders = []
    for split in (ffcv, default):
        assert split.samples == 120 and split.num_classes == 10
    for epoch in (0, 1):
        labels = [y for _, ys in ffcv.batches(epoch) for y in ys.tolist()]
        assert Counter(labels) == want, epoch
        orders.append(labels)
        assert Counter(y for _, ys in default.batches(epoch) for y in ys.tolist()) == want
    assert orders[0] != orders[1]  # FFCV reshuffles per epoch


def test_bench_loader_measures_both_loaders_on_the_same_images(data, betons):
    r = bench_loader(BenchLoaderConfig(source=f"{data}/train-{{000000..000003}}.tar", beton=betons["train"],
                                       image_size=64, batch_size=16, workers=2, epochs=2))
    assert set(r["loaders"]) == {"default (RandAugment + erasing)", "default (crop + flip)", "ffcv (crop + flip)"}
    assert (r["images"], r["image_size"], r["workers"]) == (120, 64, 2)
    for v in r["loaders"].values():
        assert v["images_per_pass"] == 120 and len(v["seconds"]) == 2
        fastest = min(v["seconds"])  # reported to 0.1 ms: a pass of a few ms carries that rounding
        assert v["images_per_s"] == pytest.approx(120 / fastest, rel=0.01 + 0.00006 / fastest)
    speedup = r["loaders"]["ffcv (crop + flip)"]["images_per_s"] / r["loaders"]["default (crop + flip)"]["images_per_s"]
    assert r["ffcv_speedup_vs_default_crop_flip"] == pytest.approx(speedup, abs=0.01)


def test_without_ffcv_the_request_fails_clearly_and_the_default_loader_works(tmp_path, data):
    """Run where `import ffcv` fails (blocked in sys.modules, as on a machine without it)."""
    import timm

    torch.manual_seed(0)
    weights = str(tmp_path / "clf.safetensors")
    save_weights(weights, timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=10).state_dict(),
                 {"model": MODEL, "image_size": SIZE})
    code = ("import sys; sys.modules['ffcv'] = None\n"
            "from mdtrain.cli import app\n"
            "app(prog_name='mdtrain')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-c", code, "ffcv-build", "--source", f"{data}/val-000000.tar",
                          "--out", str(tmp_path / "x.beton")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2
    assert "FFCV is not installed" in bad.stderr and "libturbojpeg0-dev" in bad.stderr
    ok = subprocess.run([sys.executable, "-c", code, "eval", "--weights", weights, "--val", f"{data}/val-000000.tar",
                         "--workers", "0"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["n"] == 40
