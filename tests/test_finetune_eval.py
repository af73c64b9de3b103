"""mdtrain eval / knn against a direct computation, and the labelled data loader, on real images."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from helpers import STUDENT, TRAIN_FLAGS, mdtrain, shared_cache
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from mdcache import sources
from mdtrain import labelled
from mdtrain.checkpoint import save_weights
from mdtrain.evaluate import EvalConfig, KnnConfig, evaluate, knn

MODEL, SIZE = "vit_tiny_patch16_224", 32
CPU1 = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(demo_data) -> str:
    return str(demo_data)


def read_tar(path: str) -> list[tuple[str, Image.Image, int]]:
    """The direct way: tarfile + PIL, no project code."""
    items: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.rsplit(".", 1)
            items.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return [(k, Image.open(io.BytesIO(v["jpg"])).convert("RGB"), int(v["cls"])) for k, v in items.items()]


def direct_eval_inputs(paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    t = create_transform(SIZE, is_training=False, interpolation="bicubic", crop_pct=0.875,
                         mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    rows = [r for p in paths for r in read_tar(p)]
    return torch.stack([t(img) for _, img, _ in rows]), torch.tensor([y for _, _, y in rows])


def test_eval_matches_direct_top1_top5(tmp_path, data):
    torch.manual_seed(3)
    model = timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=10)
    weights = str(tmp_path / "clf.safetensors")
    save_weights(weights, model.state_dict(), {"model": MODEL, "image_size": SIZE, "num_classes": 10})
    r = evaluate(EvalConfig(weights=weights, val=f"{data}/val-000000.tar", precision="fp32", workers=0, batch_size=16))

    x, y = direct_eval_inputs([f"{data}/val-000000.tar"])
    model.eval()
    with torch.no_grad():
        logits = model(x).numpy()
    order = np.argsort(-logits, axis=1)
    top1 = 100 * np.mean(order[:, 0] == y.numpy())
    top5 = 100 * np.mean([yy in row[:5] for yy, row in zip(y.numpy(), order)])
    assert r["n"] == len(y) == 40
    assert r["top1"] == pytest.approx(top1) and r["top5"] == pytest.approx(top5)
    assert r["loss"] == pytest.approx(torch.nn.functional.cross_entropy(torch.from_numpy(logits), y).item(), rel=1e-4)


def dino_knn(train_f: np.ndarray, train_y: np.ndarray, val_f: np.ndarray, val_y: np.ndarray, k: int, t: float,
             c: int) -> tuple[float, float]:
    """DINO's knn_classifier written out in numpy: one-hot votes weighted by exp(cos / T)."""
    train_f = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    val_f = val_f / np.linalg.norm(val_f, axis=1, keepdims=True)
    hit1 = hit5 = 0
    for f, y in zip(val_f, val_y):
        sim = train_f @ f
        nn = np.argsort(-sim)[:k]
        votes = np.zeros(c)
        for j in nn:
            votes[train_y[j]] += np.exp(sim[j] / t)
        ranked = np.argsort(-votes)
        hit1 += ranked[0] == y
        hit5 += y in ranked[:5]
    return 100 * hit1 / len(val_y), 100 * hit5 / len(val_y)


def test_knn_matches_direct_dino_computation(tmp_path, data):
    torch.manual_seed(1)
    backbone = timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=0)
    student = str(tmp_path / "student.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, student)
    train = f"{data}/train-{{000000..000003}}.tar"
    r = knn(KnnConfig(weights=student, model=MODEL, image_size=SIZE, train=train, val=f"{data}/val-000000.tar",
                      precision="fp32", workers=0))

    backbone.eval()
    with torch.no_grad():
        xt, yt = direct_eval_inputs([f"{data}/train-{i:06d}.tar" for i in range(4)])
        xv, yv = direct_eval_inputs([f"{data}/val-000000.tar"])
        ft = backbone.forward_features(xt)[:, 0].numpy()  # CLS token after the final norm
        fv = backbone.forward_features(xv)[:, 0].numpy()
    top1, top5 = dino_knn(ft, yt.numpy(), fv, yv.numpy(), k=20, t=0.07, c=10)
    assert (r["n"], r["train_n"], r["k"]) == (40, 120, 20)
    assert r["top1"] == pytest.approx(top1) and r["top5"] == pytest.approx(top5)
    assert r["top1"] > 10  # the photo classes are separable even for random features


def test_cli_eval_and_knn_print_json(tmp_path, data):
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=10)
    weights = str(tmp_path / "best.safetensors")
    save_weights(weights, model.state_dict(), {"model": MODEL, "image_size": SIZE, "num_classes": 10})
    out = {}
    for cmd in (["eval", "--val", f"{data}/val-000000.tar"],
                ["knn", "--train", f"{data}/train-000000.tar", "--val", f"{data}/val-000000.tar", "--k", "5"]):
        r = mdtrain(*cmd, "--weights", weights, "--workers", "0", env=CPU1)
        out[cmd[0]] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["eval"]["n"] == 40 and out["eval"]["num_classes"] == 10 and out["eval"]["image_size"] == SIZE
    assert out["knn"]["k"] == 5 and out["knn"]["train_n"] == 30 and out["knn"]["image_size"] == SIZE
    assert any("head.weight" in n for n in out["knn"]["ignored"])  # finetuned classifier ignored for k-NN
    missing = mdtrain("eval", "--val", f"{data}/val-000000.tar", "--weights", str(tmp_path / "nope.safetensors"),
                      check=False, env=CPU1)  # the demo once reported this as "does not record its model name"
    assert missing.returncode != 0 and "nope.safetensors: no such weights file" in missing.stderr, missing.stderr


def test_knn_of_a_pretrained_student_needs_only_its_weights(tmp_path_factory, tmp_path, train_spec, data):
    """D3: `mdtrain knn --weights runs/pt/student.safetensors` with no --model and no --image-size runs the
    student's own model at the size it was pretrained at (the cache's 64 px), as a real pretrain wrote it."""
    from mdtrain.checkpoint import weights_metadata

    out = tmp_path / "pt"
    mdtrain("pretrain", "--cache", shared_cache(tmp_path_factory, train_spec), "--out", str(out), "--epochs", "1",
            "--stop-after", "2", *TRAIN_FLAGS)
    student = str(out / "student.safetensors")
    meta = weights_metadata(student)
    assert (meta.get("model") or meta.get("timm_model")) == STUDENT
    r = mdtrain("knn", "--weights", student, "--train", f"{data}/train-000000.tar", "--val", f"{data}/val-000000.tar",
                "--k", "5", "--workers", "0", env=CPU1)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["model"], got["image_size"], got["n"], got["train_n"]) == (STUDENT, 64, 40, 30)
    assert not any("resampled" in n for n in got["ignored"])  # the pos-embed fits: it ran at 64 px
    # An explicit size still wins (the position embedding is resampled to 32 px).
    r = mdtrain("knn", "--weights", student, "--image-size", "32", "--train", f"{data}/train-000000.tar",
                "--val", f"{data}/val-000000.tar", "--k", "5", "--workers", "0", env=CPU1)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["image_size"] == 32 and any("resampled pos_embed" in n for n in got["ignored"])


# ----------------------------------------------------------------------------- labelled data

def test_split_work_gives_every_sample_to_exactly_one_consumer():
    for n_shards in (1, 3, 4, 9):
        for consumers in (1, 2, 4):
            seen = []
            for c in range(consumers):
                mine, mod, rem = labelled.split_work(list(range(n_shards)), c, consumers)
                for s in mine:
                    seen += [(s, i) for i in range(10) if i % mod == rem]  # 10 samples per shard
            assert sorted(seen) == [(s, i) for s in range(n_shards) for i in range(10)], (n_shards, consumers)


def test_loader_workers_read_each_image_once(data):
    shards = sources.list_source(f"{data}/train-{{000000..000003}}.tar")
    for part in (shards, shards[:1]):  # shard split (4 shards), then sample split (1 shard, 2 workers)
        want = sorted(f"{part[e.shard].name}/{e.key}" for e in labelled.index_source(part))
        ds = labelled.LabelledShards(part, lambda im: torch.zeros(1), 10, shuffle=True, seed=0, keys=True)
        orders = []
        for epoch in (0, 1):
            keys = [k for _, _, ks in labelled.labelled_loader(ds, 7, 2, False, 0, epoch) for k in ks]
            assert len(keys) == len(want) and sorted(keys) == want  # every key, each exactly once
            orders.append(keys)
        assert orders[0] != orders[1]  # reshuffled per epoch


def test_class_folder_source_infers_classes(tmp_path, data):
    root = tmp_path / "folder"
    for key, img, label in read_tar(f"{data}/val-000000.tar"):
        d = root / f"class{label:02d}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{key}.jpg")
    info = labelled.scan_source(str(root))
    assert info.num_classes == 10 and info.samples == 40 and info.classes[0] == "class00"
    ds = labelled.LabelledShards(info.shards, lambda im: im.size, 10)
    got = sorted(y for _, y in ds)
    assert got == sorted(y for _, _, y in read_tar(f"{data}/val-000000.tar"))


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_corrupt_image_is_skipped_with_a_warning_naming_shard_and_key(tmp_path, data):
    good = read_tar(f"{data}/val-000000.tar")[:3]
    members = []
    for key, img, label in good:
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        members += [(f"{key}.jpg", buf.getvalue()), (f"{key}.cls", str(label).encode())]
    members += [("broken.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("broken.cls", b"1")]
    path = str(tmp_path / "bad-000000.tar")
    write_tar(path, members)
    ds = labelled.LabelledShards(sources.list_source(path), lambda im: im.size, 10)
    with pytest.warns(labelled.CorruptSampleWarning, match=r"bad-000000\.tar.*'broken'"):
        out = list(ds)
    assert len(out) == 3 and ds.skipped == 1


def test_missing_or_out_of_range_label_is_an_error_naming_the_shard(tmp_path, data):
    key, img, _ = read_tar(f"{data}/val-000000.tar")[0]
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    nolabel = str(tmp_path / "nolabel-000000.tar")
    write_tar(nolabel, [(f"{key}.jpg", buf.getvalue())])
    with pytest.raises(labelled.LabelError, match=r"nolabel-000000\.tar.*no \.cls"):
        labelled.scan_source(nolabel)
    big = str(tmp_path / "big-000000.tar")
    write_tar(big, [(f"{key}.jpg", buf.getvalue()), (f"{key}.cls", b"12")])
    with pytest.raises(labelled.LabelError, match=r"big-000000\.tar.*label 12, outside 0\.\.9"):
        list(labelled.LabelledShards(sources.list_source(big), lambda im: im.size, 10))
