"""The MaskDistill recipe as the commands resolve it, and the pieces of the cache-vs-fresh-crops study:
recipe defaults, badly mixed sources, the linear probe, the held-out distillation loss, a BEiT student,
and the study's quick form end to end."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from helpers import ROOT, TINY_TEACHER, TRAIN_FLAGS, extract_cfg, mdtrain, shared_cache

from mdcache.extract import ExtractConfig, extract, label_mixing
from mdtrain.evaluate import train_probe
from mdtrain.pretrain import PretrainConfig, resolve


def test_pretrain_recipe_defaults_follow_beit_v2():
    """LayerScale 0.1 (1e-5 for large students); betas (0.9, 0.98) and no drop path up to 300 epochs,
    (0.9, 0.999) and 0.1 beyond (BEiT v2's rule); explicit values win; jitter 0.4 stored per view."""
    base = resolve(PretrainConfig(student="vit_base_patch16_224", epochs=300))
    assert (base.layer_scale, tuple(base.betas), base.drop_path) == (0.1, (0.9, 0.98), 0.0)
    long = resolve(PretrainConfig(student="vit_base_patch16_224", epochs=800))
    assert (tuple(long.betas), long.drop_path) == ((0.9, 0.999), 0.1)
    assert resolve(PretrainConfig(student="vit_large_patch16_224")).layer_scale == 1e-5
    assert resolve(PretrainConfig(student="vit_tiny_patch16_224", student_args={"embed_dim": 1024})).layer_scale == 1e-5
    mine = resolve(PretrainConfig(layer_scale=0.0, betas=(0.9, 0.95), drop_path=0.2))
    assert (mine.layer_scale, tuple(mine.betas), mine.drop_path) == (0.0, (0.9, 0.95), 0.2)
    assert ExtractConfig().color_jitter == PretrainConfig().color_jitter == 0.4


def test_resolved_recipe_reaches_the_model_and_config(tmp_path_factory, tmp_path, train_spec):
    """The resolved values are what trains: config.json records them, the student has LayerScale 0.1."""
    out = tmp_path / "pt"
    p = mdtrain("pretrain", "--cache", shared_cache(tmp_path_factory, train_spec), "--out", str(out), "--epochs", "1",
                "--stop-after", "0", *TRAIN_FLAGS)
    assert "metrics.jsonl" in p.stderr and "loss.png" not in p.stderr  # no step, no plot: none claimed
    assert not (out / "loss.png").exists()
    cfg = json.load(open(out / "config.json"))["config"]
    assert (cfg["layer_scale"], cfg["betas"], cfg["drop_path"]) == (0.1, [0.9, 0.98], 0.0)
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    gammas = [v for k, v in ckpt["model"].items() if k.endswith("ls1.gamma")]
    assert gammas and all(torch.allclose(g, torch.full_like(g, 0.1)) for g in gammas)
    assert ckpt["step"] == 0  # --stop-after 0: the initial state, e.g. the random-init floor of a study


def test_label_mixing_measures_class_sorted_shards():
    shuffled = {f"s{i}": [3] * 10 for i in range(4)}  # 10 classes, 3 of each per shard
    assert all(m > 0.95 for m in label_mixing(shuffled).values())
    by_class = {f"s{i}": [0] * (3 * i) + [12, 12, 6] + [0] * (7 - 3 * i) for i in range(3)}  # ~3 classes each
    assert all(m < 0.6 for m in label_mixing(by_class).values())
    assert label_mixing({"one": [5]}) == {}  # one sample: nothing to say


def sorted_shards(demo_data, out):
    """The demo's training images rewritten as 4 shards sorted by class (what an unshuffled export gives)."""
    samples = []
    for i in range(4):
        with tarfile.open(demo_data / f"train-00000{i}.tar") as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, raw in members.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                samples.append((int(members[f"{key}.cls"]), key, raw))
    samples.sort()
    for s in range(4):
        with tarfile.open(out / f"sorted-{s:06d}.tar", "w") as tf:
            for label, key, raw in samples[s * 30:(s + 1) * 30]:
                for ext, blob in (("jpg", raw), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    return str(out / "sorted-{000000..000003}.tar")


def test_extract_warns_about_a_class_sorted_source(tmp_path, demo_data, train_spec, capsys):
    _, summary = extract(extract_cfg(sorted_shards(demo_data, tmp_path), str(tmp_path / "c1")), progress=False)
    assert len(summary["unmixed"]) == 4 and "hold few of the source's classes" in capsys.readouterr().err
    _, summary = extract(extract_cfg(train_spec, str(tmp_path / "c2")), progress=False)
    assert summary["unmixed"] == {} and len(summary["labels"]) == 4  # the demo's shuffled shards


def test_linear_probe_learns_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 3
    y = torch.arange(500) % 5
    x = centers[y] + torch.randn(500, 32, generator=g)
    probe = train_probe(x[:400], y[:400], 5, epochs=30, warmup_epochs=3, batch_size=64, lr=0.1, weight_decay=0.0,
                        seed=0)
    assert (probe(x[400:]).argmax(1) == y[400:]).float().mean() > 0.95
    noise = torch.randint(0, 5, (500,), generator=g)
    probe = train_probe(x[:400], noise[:400], 5, epochs=30, warmup_epochs=3, batch_size=64, lr=0.1,
                        weight_decay=0.0, seed=0)
    assert (probe(x[400:]).argmax(1) == noise[400:]).float().mean() < 0.45  # chance is 0.2


@pytest.mark.slow
def test_distill_loss_and_linprobe_of_a_pretrained_beit_student(tmp_path_factory, tmp_path, train_spec, demo_data):
    """A BEiT v2 student (relative position bias + LayerScale, as the ImageNet recipe uses) pretrains from
    the cache; knn/linprobe load it from its own metadata; the held-out loss on fresh crops of unseen
    images falls with training and is a pure function of the seed."""
    beit = ["--student", "beitv2_base_patch16_224", "--student-arg", "embed_dim=64", "--student-arg", "depth=2",
            "--student-arg", "num_heads=2"]
    flags = [f for f in TRAIN_FLAGS if f not in ("--student", "vit_tiny_patch16_224")]
    cache = shared_cache(tmp_path_factory, train_spec)
    for name, extra in (("init", ["--stop-after", "0"]), ("trained", ["--epochs", "3"])):
        mdtrain("pretrain", "--cache", cache, "--out", str(tmp_path / name), *beit, *flags, "--lr", "2e-3",
                *extra)
    val = f"{demo_data}/val-000000.tar"
    teacher = ["--teacher", TINY_TEACHER, "--random-init", "--source", val, "--image-size", "64",
               "--batch-size", "8", "--workers", "0"]

    def heldout(name, *extra):
        r = mdtrain("distill-loss", "--ckpt", str(tmp_path / name / "last.ckpt"), *teacher, *extra)
        return json.loads(r.stdout.strip().splitlines()[-1])

    init, trained = heldout("init"), heldout("trained")
    assert init["images"] == trained["images"] == 40
    assert trained["loss"] < init["loss"]
    assert heldout("trained")["loss"] == trained["loss"]
    assert heldout("trained", "--seed", "7")["loss"] != trained["loss"]
    # the crops it trained on: every stored view of every training image (2 views x 120 images), fp32 teacher
    stored = json.loads(mdtrain("distill-loss", "--ckpt", str(tmp_path / "trained" / "last.ckpt"), "--teacher",
                                TINY_TEACHER, "--random-init", "--cache", cache, "--batch-size", "8", "--workers",
                                "0").stdout.strip().splitlines()[-1])
    assert stored["crops"] == "stored" and stored["images"] == 240 and stored["loss"] < init["loss"]
    r = mdtrain("linprobe", "--weights", str(tmp_path / "trained" / "student.safetensors"), "--train", train_spec,
                "--val", val, "--epochs", "5", "--workers", "0")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["model"], got["image_size"], got["n"], got["train_n"]) == ("beitv2_base_patch16_224", 64, 40, 120)
    assert not got["ignored"] and 0 <= got["top1"] <= 100 and got["train_top1"] > 10  # fits its training set


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two studies end to end: about 6 minutes on 2 idle cores, far more on busy ones
def test_study_quick_form_produces_every_output(tmp_path):
    """pipelines/study/run.py --quick: every stage runs through the real commands and writes its outputs, with
    every path relative to the run folder; the statistics are those of seed-paired differences."""
    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        pytest.fail("the study needs Debian's dataset-fashion-mnist package (scripts/apt-packages.txt installs it)")
    out = tmp_path / "study"
    p = subprocess.run([sys.executable, "pipelines/study/run.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.load(open(out / "results.json"))
    assert set(r["arms"]) == {"online-fresh", "K=1 int8", "K=2 int8", "random-init"}
    for arm in r["arms"].values():
        assert {"heldout_loss", "train_fresh_loss", "knn_top1", "linprobe_top1", "finetune_top1"} <= set(arm)
        assert len(arm["runs"]) == 1 and "vs_scratch" in arm
    assert "train_stored_loss" in r["arms"]["K=2 int8"] and r["arms"]["K=2 int8"]["vs_online"]["knn_top1"]["n"] == 1
    assert r["arms"]["K=2 int8"]["verdict"] == "no verdict (fewer than 2 seeds)"
    # K=1 and K=2 of one seed are one cache (K=1 grown to 2): each student trained, and is scored, on its K only
    k1, k2 = r["arms"]["K=1 int8"]["runs"][0], r["arms"]["K=2 int8"]["runs"][0]
    assert k1["cache"] == k2["cache"] and (k1["views"], k2["views"]) == (1, 2)
    for arm, k in (("K1-int8", 1), ("K2-int8", 2)):
        ran = json.load(open(out / "students" / arm / "seed0" / "config.json"))
        assert ran["config"]["cache_views"] == k
    assert r["teacher"]["test_top1"] > 10 and r["raw_pixels"]["knn_top1"] > 50 and r["scratch"]["runs"]
    assert all(r["train_seconds"][k] > 0 for k in ("teacher", "students_pretraining", "finetunes"))
    assert str(tmp_path) not in json.dumps(r)  # paths relative to the run folder
    assert (out / "study.png").stat().st_size > 10_000 and (out / "curves.png").exists()
    assert "Arm minus online-fresh, seed-paired" in (out / "results.md").read_text()
    # the partial report of a study still running reads the same outputs: every finished run, one row each
    part = subprocess.run([sys.executable, "pipelines/study/partial.py", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert part.returncode == 0, part.stderr
    rows = [line for line in part.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| ---") and "seed |" not in line]
    assert {r.split(" | ")[0][2:] for r in rows} == {"online-fresh", "K1-int8", "K2-int8", "random-init", "scratch"}
    assert "K2-int8 - online, knn_top1" in part.stdout and "(n=1): no interval" in part.stdout
    # the report again, from finished steps only: the same numbers; a step not run is named, nothing runs
    again = subprocess.run([sys.executable, "pipelines/study/run.py", "--quick", "--out", str(out), "--report-only"],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.load(open(out / "results.json"))["arms"] == r["arms"]
    other = subprocess.run([sys.executable, "pipelines/study/run.py", "--quick", "--out", str(out), "--report-only",
                            "--seeds", "0,1"], cwd=ROOT, capture_output=True, text=True)
    assert other.returncode != 0 and "--report-only, and this step has not finished" in other.stderr
    changed = subprocess.run([sys.executable, "pipelines/study/run.py", "--quick", "--out", str(out), "--report-only",
                              "--epochs", "3"], cwd=ROOT, capture_output=True, text=True)
    assert changed.returncode != 0 and "ran with" in changed.stderr  # no relabelled students
    # the caches-that-grow study on the same run folder: it reuses the data, the ViT teacher, its K=2 cache and
    # student, and adds a CNN teacher on those views, students of each and of both, and a grown cache
    t = subprocess.run([sys.executable, "pipelines/study/teachers.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-3000:]
    g = json.load(open(out / "teachers" / "results.json"))
    assert g["students"]["vit"]["from"] == "students/K2-int8/seed0"  # the views study's student, not trained again
    assert g["students"]["cnn"]["teacher_weights"] == ["0", "1"] and g["students"]["cnn"]["heldout_loss"] is None
    assert all(g["students"][k]["heldout_loss_cnn_head"] > 0 for k in ("cnn", "vit+cnn"))  # head 1 vs the CNN
    assert all(0 <= g["students"][k][m] <= 100 for k in ("cnn", "vit+cnn") for m in ("knn_top1", "finetune_top1"))
    second = g["two_teacher_run"][1]  # the CNN's 4x4 map at 28 px (the size it trained at), resampled
    assert second["grid"] == [4, 4] and second["targets"] == "bilinear 4x4 -> 7x7"
    assert g["growth"]["same_cache_grown"] and g["growth"]["identical_bytes"] and g["growth"]["identical_students"]
    assert g["teachers"]["cnn"]["test_top1"] > 10 and str(tmp_path) not in json.dumps(g)


def test_study_statistics_are_seed_paired_with_a_t_interval():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_run", ROOT / "pipelines" / "study" / "run.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    ref = [{"seed": s, "knn_top1": 80.0 + s} for s in range(3)]
    same = [{"seed": s, "knn_top1": 80.0 + s + d} for s, d in zip(range(3), (0.1, -0.1, 0.05))]
    p = study.paired(same, ref, "knn_top1")
    assert p["n"] == 3 and abs(p["mean"] - 0.05 / 3) < 1e-9 and p["verdict"] == "equivalent"
    half = 4.303 * float(torch.tensor([0.1, -0.1, 0.05]).std()) / 3 ** 0.5  # t(0.975, 2 df)
    assert abs((p["ci95"][1] - p["ci95"][0]) / 2 - half) < 1e-6
    worse = [{"seed": s, "knn_top1": 78.0 + s + d} for s, d in zip(range(3), (0.1, -0.1, 0.05))]
    assert study.paired(worse, ref, "knn_top1")["verdict"] == "worse"
    noisy = [{"seed": s, "knn_top1": 80.0 + s + d} for s, d in zip(range(3), (2.0, -2.0, 0.5))]
    assert study.paired(noisy, ref, "knn_top1")["verdict"] == "undecided"
    # partly outside the margin is not "worse": the rule needs the whole interval outside
    edge = [{"seed": s, "knn_top1": 80.0 + s + d} for s, d in zip(range(3), (-0.5, -0.7, -0.6))]
    assert study.paired(edge, ref, "knn_top1")["verdict"] == "undecided"
    # against scratch the rule is the sign: an interval above zero helps, however small
    assert study.paired(same, ref, "knn_top1", rule="sign")["verdict"] == "undecided"
    small = [{"seed": s, "knn_top1": 80.0 + s + d} for s, d in zip(range(3), (0.2, 0.3, 0.25))]
    assert study.paired(small, ref, "knn_top1", rule="sign")["verdict"] == "helps"
    assert study.paired(small, ref, "knn_top1")["verdict"] == "equivalent"
    one = study.paired(same[:1], ref, "knn_top1")
    assert one["ci95"] is None and one["verdict"].startswith("no interval") and json.dumps(one)  # no NaN or inf
    # an arm is equivalent only when all three top-1 metrics are, worse when any is
    eq = {"verdict": "equivalent"}
    assert study.arm_verdict({"knn_top1": eq, "linprobe_top1": eq, "finetune_top1": eq}) == "equivalent"
    assert study.arm_verdict({"knn_top1": eq, "linprobe_top1": eq, "finetune_top1": {"verdict": "undecided"}}) \
        == "undecided"
    assert study.arm_verdict({"knn_top1": {"verdict": "worse"}, "linprobe_top1": {"verdict": "better"},
                              "finetune_top1": eq}) == "worse"
    assert abs(study.t_975(30) - 2.042) < 1e-9 and abs(study.t_975(40) - 2.021) < 2e-3  # not z's 1.96


def test_weights_files_respect_the_umask(tmp_path):
    """safetensors writes 0600 by itself: a teammate on a shared disk could not read the weights."""
    from mdtrain.checkpoint import save_weights

    old = os.umask(0o022)
    try:
        save_weights(str(tmp_path / "w.safetensors"), {"a": torch.zeros(2)}, {"model": "x"})
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
