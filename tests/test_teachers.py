"""Teacher weights files are data, never code: read with safetensors or a weights-only torch.load."""
import os

import pytest
import timm
import torch
from helpers import TINY_CLIP, TINY_TEACHER, run_cli
from safetensors.torch import save_file

from mdcache.errors import TeacherError
from mdcache.teachers import load_teacher, weights_digest
from mdcache.weights import WeightsError

TIMM_TEACHER = "timm:vit_tiny_patch16_224"


class Evil:
    """Unpickling this runs a shell command that leaves a marker file behind."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_weights_are_refused_and_never_run(tmp_path, train_spec):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil(str(marker))}, evil)
    p = run_cli("extract", "--source", train_spec, "--root", str(tmp_path / "c"), "--teacher", TINY_TEACHER,
                "--image-size", "64", "--teacher-weights", str(evil), "--workers", "0", check=False)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "evil.pth" in lines[-1] and "refused" in lines[-1], p.stderr
    assert "Traceback" not in p.stderr
    assert not marker.exists(), "the weights file was unpickled"
    assert not (tmp_path / "c").exists()  # refused before any cache was created


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_teacher_from_a_weights_file(tmp_path, suffix):
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    path = str(tmp_path / f"w{suffix}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    t = load_teacher(TIMM_TEACHER, weights=path, image_size=32)
    assert t.identity["weights_sha256"] == weights_digest(model)
    assert t.identity["weights"] == f"file:w{suffix}" and t.patch_grid == (2, 2) and t.dim == 192
    other = load_teacher(TIMM_TEACHER, random_init=True, image_size=32, seed=4)  # a negative control
    assert other.identity["weights_sha256"] != t.identity["weights_sha256"]


def test_timm_weights_with_a_classifier_head_load_into_the_headless_teacher(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32)  # 1000-class head, as published weights
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    model.reset_classifier(0)
    assert load_teacher(TIMM_TEACHER, weights=path, image_size=32).identity["weights_sha256"] == weights_digest(model)


def test_open_clip_full_or_visual_state_dict(tmp_path):
    import open_clip

    open_clip.add_model_config(TINY_CLIP)
    torch.manual_seed(5)
    model = open_clip.create_model("tiny-clip")
    full, visual = str(tmp_path / "full.safetensors"), str(tmp_path / "visual.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, full)
    save_file({k: v.contiguous() for k, v in model.visual.state_dict().items()}, visual)
    digest = weights_digest(model.visual)
    assert load_teacher(TINY_TEACHER, weights=full, image_size=64).identity["weights_sha256"] == digest
    assert load_teacher(TINY_TEACHER, weights=visual, image_size=64).identity["weights_sha256"] == digest


def test_weights_that_do_not_fit_name_the_file_and_keys(tmp_path):
    path = str(tmp_path / "timm.safetensors")
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", num_classes=0,
                                                                img_size=32).state_dict().items()}, path)
    with pytest.raises(TeacherError, match=r"timm\.safetensors: does not fit this teacher: missing keys .*conv1"):
        load_teacher(TINY_TEACHER, weights=path, image_size=64)
    with pytest.raises(WeightsError, match="no such weights file"):
        load_teacher(TIMM_TEACHER, weights=str(tmp_path / "nope.pth"), image_size=32)


def test_a_teacher_trained_by_finetune_is_fed_what_it_learned_on(tmp_path, demo_data):
    """mdtrain finetune trains with ImageNet's mean/std and records it (and its pooling) in the weights; the
    teacher used to take timm's default config instead (0.5/0.5 for this model: 0.46x the contrast it learned
    on), while `eval` used the recorded one. Now extract, online pretraining, distill-loss, verify and eval
    all feed it the recorded normalization: its stored targets are its features as eval computes them."""
    import json

    from helpers import invoke

    from mdcache import open_cache, views
    from mdcache.extract import extract
    from mdcache.sources import iter_samples, list_source
    from mdtrain.evaluate import _mean_std

    out = tmp_path / "teacher"
    r = invoke("finetune", "--model", "vit_tiny_patch16_224", "--model-arg", "depth=2", "--image-size", "32",
               "--train", demo_data / "train-000000.tar", "--val", demo_data / "val-000000.tar", "--out", out,
               "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--workers", "0", "--aa", "none",
               "--mixup", "0", "--cutmix", "0", module="mdtrain")
    assert r.exit_code == 0, r.stderr[-2000:]
    weights = str(out / "best.safetensors")
    from mdcache.weights import read_metadata

    meta = read_metadata(weights)
    recorded = tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
    assert recorded == _mean_std("vit_tiny_patch16_224", meta) and recorded[0] != (0.5, 0.5, 0.5)
    teacher = load_teacher(TIMM_TEACHER, weights=weights, image_size=32)  # depth and pooling from the weights
    assert (teacher.mean, teacher.std) == recorded and teacher.identity["mean"] == list(recorded[0])
    assert load_teacher(TIMM_TEACHER, weights=weights).image_size == 32  # the size it trained at, unasked
    from helpers import extract_cfg

    cfg = extract_cfg(str(demo_data / "train-000000.tar"), str(tmp_path / "c"), teacher=TIMM_TEACHER,
                      teacher_weights=weights,
                      random_init=False, image_size=32, views=1, codec="fp16")
    url, _ = extract(cfg, progress=False)
    cache = open_cache(url)
    keys, targets, params = cache.read("train-000000", 0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=2, global_pool="avg")
    from mdcache.teachers import load_into
    from mdcache.weights import read_state_dict

    load_into(model, {k: v for k, v in read_state_dict(weights).items() if not k.startswith("head.")}, weights)
    sample = next(iter_samples(list_source(str(demo_data / "train-000000.tar"))[0]))
    x = views.normalize(views.view_pixels(views.decode_image(sample.data), params[0], 32, cache.replay)[None],
                        *recorded)  # eval's preprocessing: the recorded mean/std
    with torch.no_grad():
        ref = model.eval().forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[0]
    assert keys[0] == sample.key and torch.allclose(torch.from_numpy(targets[0]), ref[0], atol=2e-3, rtol=1e-3)


def test_a_cnn_teacher_runs_at_the_size_its_weights_trained_at(tmp_path):
    """A CNN takes any input size, so nothing used to stop a ResNet trained on 28 px images (as the study's
    second teacher) from being fed 224 px views: 8x larger shapes than it ever saw, a 28x28 feature map
    instead of its 4x4. Its weights record the size (`mdtrain finetune` writes it): that is the default."""
    from mdtrain.checkpoint import save_weights, weights_meta

    args = {"output_stride": 8, "channels": [8, 16, 32, 64]}
    model = timm.create_model("resnet18", num_classes=10, **args)
    path = str(tmp_path / "cnn.safetensors")
    save_weights(path, model.state_dict(), weights_meta("classifier", "resnet18", 28, (0.5,) * 3, (0.25,) * 3,
                                                        args, num_classes=10, global_pool="avg"))
    t = load_teacher("timm:resnet18", weights=path)
    assert (t.image_size, t.patch_grid, t.dim) == (28, (4, 4), 64) and t.identity["image_size"] == 28
    assert load_teacher("timm:resnet18", weights=path, image_size=56).patch_grid == (7, 7)  # --image-size wins


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip-b16", "clip-l14"])
def test_the_registry_shapes_are_the_models(name):
    """`mdcache plan` prices named teachers from the registry without building them: the recorded shapes must be
    the models' (built here with random weights, at the default tap and 224 px)."""
    from mdcache.teachers import NAMED

    t = load_teacher(name, random_init=True)
    assert (t.num_patches, t.dim) == (NAMED[name].tokens, NAMED[name].dim)


def test_open_clip_teachers_refuse_model_arguments():
    with pytest.raises(TeacherError, match="model arguments are for timm teachers"):
        load_teacher(TINY_TEACHER, random_init=True, model_args={"depth": 2})
