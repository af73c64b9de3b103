"""The FFCV path: ffcv-build from real tar shards, --loader ffcv training, the loader benchmark, and
the clear message (with the default loader still working) where FFCV is not installed."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from mdtrain.ffcv_loader import (BenchLoaderConfig, FfcvBuildConfig, beton_info, bench_loader, build_beton,
                                 ffcv_available)
from mdtrain.finetune import FinetuneConfig, finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, SIZE = "vit_tiny_patch16_224", 32
needs_ffcv = pytest.mark.skipif(not ffcv_available(), reason="ffcv is not importable (see docs/finetune.md: apt "
                                "packages pkg-config libturbojpeg0-dev libopencv-dev, then pip install ffcv pillow)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(demo_data) -> str:
    return str(demo_data)


@pytest.fixture(scope="module")
def betons(data, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("beton")
    out = {}
    for name, spec in (("train", f"{data}/train-{{000000..000003}}.tar"), ("val", f"{data}/val-000000.tar")):
        out[name] = str(d / f"{name}.beton")
        build_beton(FfcvBuildConfig(source=spec, out=out[name], max_resolution=64, num_workers=2))
    return out


def tar_labels(path: str) -> list[int]:
    with tarfile.open(path) as tf:
        return [int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls")]


@needs_ffcv
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
                                num_workers=1))
    loader = Loader(raw, batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images = np.concatenate([np.array(x, copy=True) for x, _ in loader])
    with tarfile.open(f"{data}/val-000000.tar") as tf:
        ref = [np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
               for m in tf if m.name.endswith(".jpg")]
    assert images.shape == (40, 256, 256, 3)
    assert all(np.array_equal(a, b) for a, b in zip(images, ref))


@needs_ffcv
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
        build_beton(FfcvBuildConfig(source=str(tmp_path / "bad-000000.tar"), out=out, num_workers=1))
    assert type(e.value).__name__ == "SourceError"
    assert not os.path.exists(out)


@needs_ffcv
def test_ffcv_and_default_loaders_train_the_same_model(tmp_path, data, betons):
    """Same recipe, same data, same init: both loaders train the same model (same architecture and
    state-dict layout, same number of images per epoch) and both beat chance (10%) on the validation
    images; the FFCV-trained weights score as well when the default loader reads the images."""
    torch_student = tmp_path / "student.safetensors"
    import timm

    torch.manual_seed(0)
    m = timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=0)
    safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(torch_student))
    common = dict(model=MODEL, init=str(torch_student), input_size=SIZE, epochs=5, warmup_epochs=1, batch_size=16,
                  lr=1e-3, log_every=0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0)
    # One FFCV thread: on 2 cores more threads only fight torch's own (measured 2x slower).
    r_ffcv = finetune(FinetuneConfig(train=betons["train"], val=betons["val"], loader="ffcv", num_workers=1,
                                     out=str(tmp_path / "ffcv"), **common))
    r_default = finetune(FinetuneConfig(train=f"{data}/train-{{000000..000003}}.tar", val=f"{data}/val-000000.tar",
                                        num_workers=0, out=str(tmp_path / "default"), **common))
    assert r_ffcv["num_classes"] == r_default["num_classes"] == 10
    assert r_ffcv["best_top1"] >= 40 and r_default["best_top1"] >= 40, (r_ffcv, r_default)
    wf = safetensors.torch.load_file(str(tmp_path / "ffcv" / "last.safetensors"))
    wd = safetensors.torch.load_file(str(tmp_path / "default" / "last.safetensors"))
    assert {k: v.shape for k, v in wf.items()} == {k: v.shape for k, v in wd.items()}
    rows = [json.loads(x) for x in open(tmp_path / "ffcv" / "metrics.jsonl")]
    assert len(rows) == 5 and all(r["val_n"] == 40 for r in rows) and rows[0]["images"] == 112
    # The FFCV-trained classifier, evaluated by the default (PIL) loader, is as good as FFCV said.
    from mdtrain.evaluate import EvalConfig, evaluate

    e = evaluate(EvalConfig(weights=str(tmp_path / "ffcv" / "last.safetensors"), val=f"{data}/val-000000.tar",
                            num_workers=0))
    assert e["top1"] >= 40 and abs(e["top1"] - rows[-1]["val_top1"]) <= 15


@needs_ffcv
def test_bench_loader_measures_both_loaders_on_the_same_images(data, betons):
    r = bench_loader(BenchLoaderConfig(source=f"{data}/train-{{000000..000003}}.tar", beton=betons["train"],
                                       input_size=64, batch_size=16, num_workers=2, epochs=2))
    assert set(r["loaders"]) == {"default (RandAugment + erasing)", "default (crop + flip)", "ffcv (crop + flip)"}
    for v in r["loaders"].values():
        assert v["images_per_pass"] == 120 and v["images_per_s"] > 0
    assert r["ffcv_speedup_vs_default_crop_flip"] > 0


def test_without_ffcv_the_request_fails_clearly_and_the_default_loader_works(tmp_path, data):
    """Run where `import ffcv` fails (blocked in sys.modules, as on a machine without it)."""
    import timm

    from mdtrain.finetune import save_weights

    torch.manual_seed(0)
    weights = str(tmp_path / "clf.safetensors")
    save_weights(timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=10), weights,
                 {"model": MODEL, "input_size": SIZE})
    code = ("import sys; sys.modules['ffcv'] = None\n"
            "from mdtrain.cli import app\n"
            "app(prog_name='mdtrain')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-c", code, "ffcv-build", "--source", f"{data}/val-000000.tar",
                          "--out", str(tmp_path / "x.beton")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2
    assert "FFCV is not installed" in bad.stderr and "libturbojpeg0-dev" in bad.stderr
    ok = subprocess.run([sys.executable, "-c", code, "eval", "--weights", weights, "--val", f"{data}/val-000000.tar",
                         "--num-workers", "0"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["n"] == 40
