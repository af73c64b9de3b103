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
    p = run_cli("extract", "--source", train_spec, "--cache", str(tmp_path / "c"), "--teacher", TINY_TEACHER,
                "--image-size", "64", "--weights", str(evil), "--workers", "0", check=False)
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
