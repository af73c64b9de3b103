"""One student, several teachers (RADIO/Theia style): `mdtrain pretrain --cache A --cache B` streams caches of two
teachers on the same views (`mdcache extract --views-of`) in lockstep, with one linear head per teacher and the
weighted sum of the per-teacher MaskDistill losses on the same masked tokens. A teacher on another patch grid has
its targets resampled to the student's. Offline equals online (`--teacher` per cache)."""
import json

import pytest
import torch
from helpers import STUDENT, TINY_TEACHER, extract_cfg, invoke, read_jsonl

from mdcache import open_cache
from mdcache.extract import extract
from mdtrain.pretrain import on_grid
from mdtrain.student import build_student

FLAGS = ["--student", STUDENT, "--batch-size", "8", "--warmup-epochs", "0", "--lr", "1e-3", "--workers", "0",
         "--shuffle-buffer", "8", "--no-progress", "--log-every", "1", "--epochs", "1", "--stop-after", "4",
         "--precision", "fp32"]


@pytest.fixture(scope="module")
def caches(train_spec, tmp_path_factory):
    """A: the tiny teacher at 64 px (4x4 grid); B: another teacher (seed 1) on A's views at 64 px; C: that teacher
    on A's views at 32 px (2x2 grid: its targets are resampled to the student's 4x4)."""
    root, spec = str(tmp_path_factory.mktemp("multi")), train_spec.replace("000003", "000001")
    a, _ = extract(extract_cfg(spec, root), progress=False)
    b, _ = extract(extract_cfg(spec, root, views_of=a, teacher_seed=1), progress=False)
    c, _ = extract(extract_cfg(spec, root, views_of=a, teacher_seed=1, image_size=32), progress=False)
    other, _ = extract(extract_cfg(spec, root, teacher_seed=1), progress=False)  # B's teacher on views of its own
    return {"a": a, "b": b, "c": c, "other": other}


def pretrain(*args: str):
    r = invoke("pretrain", *args, *FLAGS, module="mdtrain")
    assert r.exit_code == 0, r.stderr[-3000:]
    return r


def test_two_teachers_from_two_caches_equal_two_online_teachers(caches, tmp_path):
    """The offline two-teacher run and the online one (each teacher run on its cache's views) see the same
    images, masks and targets (fp16 rounding apart): the same losses step by step."""
    both = ["--cache", caches["a"], "--cache", caches["b"], "--teacher-weight", "1", "--teacher-weight", "0.5"]
    pretrain(*both, "--out", str(tmp_path / "off"))
    online = ["--teacher", TINY_TEACHER, "--teacher", TINY_TEACHER, "--random-init"]  # built from each cache's record
    pretrain(*both, *online, "--out", str(tmp_path / "on"))
    off = [r["loss"] for r in read_jsonl(tmp_path / "off" / "metrics.jsonl")]
    on = [r["loss"] for r in read_jsonl(tmp_path / "on" / "metrics.jsonl")]
    assert len(off) == len(on) == 4 and off != on  # two computations (fp16 targets vs fp32 teachers) ...
    for x, y in zip(off, on):  # ... equal to within the targets' fp16 rounding
        assert abs(x - y) <= 2e-3 * abs(y), (off, on)
    config = json.loads((tmp_path / "off" / "config.json").read_text())
    ids = [open_cache(caches[k]).cache_id for k in "ab"]
    assert [t["cache_id"] for t in config["teachers"]] == ids and [t["weight"] for t in config["teachers"]] == [1, 0.5]
    ckpt = torch.load(tmp_path / "off" / "last.ckpt", weights_only=True)
    assert {"head.weight", "extra_heads.0.weight"} <= set(ckpt["model"])


def test_the_second_teacher_counts_with_its_weight(caches, tmp_path):
    """Weight 0 for the second teacher: exactly the single-teacher run's losses (its head gets no gradient);
    weight 1: other losses. The heads are the teachers' own."""
    pretrain("--cache", caches["a"], "--out", str(tmp_path / "one"))
    pretrain("--cache", caches["a"], "--cache", caches["b"], "--teacher-weight", "1", "--teacher-weight", "0",
             "--out", str(tmp_path / "zero"))
    pretrain("--cache", caches["a"], "--cache", caches["b"], "--out", str(tmp_path / "two"))
    one, zero, two = ([r["loss"] for r in read_jsonl(tmp_path / n / "metrics.jsonl")] for n in ("one", "zero", "two"))
    assert one == pytest.approx(zero, rel=1e-5) and two[0] > one[0] * 1.2
    r = invoke("distill-loss", "--ckpt", str(tmp_path / "two" / "last.ckpt"), "--teacher", TINY_TEACHER,
               "--random-init", "--cache", caches["a"], "--batch-size", "8", "--workers", "0", module="mdtrain")
    assert r.exit_code == 0, r.stderr[-2000:]  # a multi-teacher student, measured on its first teacher's head
    first = json.loads(r.stdout.strip().splitlines()[-1])
    # --head 1: the second head against the second teacher (seed 1), on the same crops
    second = invoke("distill-loss", "--ckpt", str(tmp_path / "two" / "last.ckpt"), "--teacher", TINY_TEACHER,
                    "--random-init", "--teacher-seed", "1", "--head", "1", "--cache", caches["a"], "--batch-size",
                    "8", "--workers", "0", module="mdtrain")
    assert second.exit_code == 0, second.stderr[-2000:]
    got = json.loads(second.stdout.strip().splitlines()[-1])
    assert got["head"] == 1 and got["loss"] > 0 and got["loss"] != first["loss"] and got["images"] == first["images"]
    none = invoke("distill-loss", "--ckpt", str(tmp_path / "two" / "last.ckpt"), "--teacher", TINY_TEACHER,
                  "--random-init", "--head", "2", "--cache", caches["a"], module="mdtrain")
    assert none.exit_code == 2 and "has 2 head(s) (0-1)" in " ".join(none.stderr.split())


def test_a_teacher_on_another_grid_is_resampled_to_the_students(caches, tmp_path):
    pretrain("--cache", caches["a"], "--cache", caches["c"], "--out", str(tmp_path / "grid"))
    config = json.loads((tmp_path / "grid" / "config.json").read_text())
    assert config["grid"] == [4, 4] and config["teachers"][1]["grid"] == [2, 2]
    assert config["teachers"][1]["targets"] == "bilinear 2x2 -> 4x4"
    rows = read_jsonl(tmp_path / "grid" / "metrics.jsonl")
    assert len(rows) == 4 and all(r["loss"] > 0 for r in rows)
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # [B, 2x2 tokens, D]
    y = on_grid(x, (2, 2), (4, 4))
    assert y.shape == (2, 16, 3) and torch.allclose(y.mean(1), x.mean(1))  # bilinear x2 keeps the mean
    assert on_grid(x, (2, 2), (2, 2)) is x


def test_a_convolutional_teacher_on_the_same_views(caches, train_spec, tmp_path):
    """A timm CNN (ResNet-18, random weights) as the second teacher: the cells of its last feature map are its
    tokens (2x2 at 64 px, 512 channels); its cache verifies against the teacher, and a student learns from both."""
    spec = train_spec.replace("000003", "000001")
    cnn, _ = extract(extract_cfg(spec, str(tmp_path), views_of=caches["a"], teacher="timm:resnet18"), progress=False)
    cache = open_cache(cnn)
    assert (cache.patch_grid, cache.teacher_dim) == ((2, 2), 512)
    check = invoke("verify", cnn, "--teacher-check", "4")
    assert check.stdout.strip() == "OK" and "teacher check on 4 replayed views" in check.stderr
    pretrain("--cache", caches["a"], "--cache", cnn, "--out", str(tmp_path / "run"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["teachers"][1]["dim"] == 512 and config["teachers"][1]["targets"] == "bilinear 2x2 -> 4x4"
    # the CNN's head, measured against the CNN: its 2x2 targets resampled to the student's 4x4, as in training
    r = invoke("distill-loss", "--ckpt", str(tmp_path / "run" / "last.ckpt"), "--teacher", "timm:resnet18",
               "--random-init", "--head", "1", "--cache", caches["a"], "--batch-size", "8", "--workers", "0",
               module="mdtrain")
    assert r.exit_code == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["loss"] > 0


def test_a_transcoded_cache_keeps_its_sources_views(caches, tmp_path):
    """A transcode of A has A's views: it trains beside B (made on A's views) and `ls` groups all three."""
    from helpers import run_cli

    a2 = run_cli("transcode", caches["a"], "--codec", "int8", "--root", str(tmp_path)).stdout.strip().splitlines()[-1]
    pretrain("--cache", a2, "--cache", caches["b"], "--out", str(tmp_path / "run"))
    ids = [open_cache(u).cache_id for u in (caches["a"], a2)]
    assert all(i in run_cli("ls", str(tmp_path)).stdout for i in ids[1:])
    assert open_cache(a2).manifest["views_drawn_by"] == ids[0]


def test_caches_that_do_not_share_views_are_refused(caches, tmp_path):
    r = invoke("pretrain", "--cache", caches["a"], "--cache", caches["other"], *FLAGS, "--out", str(tmp_path / "x"),
               module="mdtrain")
    assert r.exit_code == 2 and "does not share views" in r.stderr and "--views-of" in r.stderr
    r = invoke("pretrain", "--cache", caches["a"], "--cache", caches["b"], "--teacher-weight", "1", *FLAGS,
               "--out", str(tmp_path / "y"), module="mdtrain")
    assert r.exit_code == 2 and "one weight per cache" in r.stderr
    r = invoke("pretrain", "--cache", caches["a"], "--cache", caches["c"], "--teacher", TINY_TEACHER, "--teacher",
               TINY_TEACHER, "--random-init", *FLAGS, "--out", str(tmp_path / "z"), module="mdtrain")
    assert r.exit_code == 2 and "32 px" in r.stderr  # online, every teacher sees the student's pixels


def test_a_student_with_extra_heads_keeps_a_single_teachers_names():
    one = build_student(STUDENT, image_size=64, grid=(4, 4), teacher_dim=24)
    two = build_student(STUDENT, image_size=64, grid=(4, 4), teacher_dim=24, extra_dims=(40,))
    assert set(two.state_dict()) - set(one.state_dict()) == {"extra_heads.0.weight", "extra_heads.0.bias"}
    out = two(torch.zeros(2, 3, 64, 64), torch.zeros(2, 16, dtype=torch.bool))
    assert [o.shape for o in out] == [(2, 16, 24), (2, 16, 40)]
    assert two.backbone_state_dict().keys() == one.backbone_state_dict().keys()  # the weights file is the backbone
