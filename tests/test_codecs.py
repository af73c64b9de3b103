"""Codec fidelity on real teacher features (tiny real open_clip ViT, random init, real photos)."""
import numpy as np
import pytest
import torch

from conftest import TINY_TEACHER
from mdcache import codecs, teachers
from mdcache.extract import image_views
from mdcache.sources import iter_samples, list_source
from mdcache.views import ViewRecipe


@pytest.fixture(scope="module")
def feats(train_spec) -> torch.Tensor:
    t = teachers.load_teacher(TINY_TEACHER, random_init=True, image_size=64)
    recipe = ViewRecipe(image_size=64, views=2)
    xs = [image_views(s, recipe, t.mean, t.std)[0] for _, s in zip(range(16), iter_samples(list_source(train_spec)[0]))]
    return teachers.run_teacher(t, torch.cat(xs))


def roundtrip(name, x, calib_from=None):
    calib = codecs.calibrate(name, (calib_from if calib_from is not None else x)[:8])
    enc = codecs.encode(name, x, calib)
    assert set(enc) == set(codecs.CODEC_ARRAYS[name])
    for a, (dtype, rank) in codecs.CODEC_ARRAYS[name].items():
        assert enc[a].dtype == np.dtype(dtype) and enc[a].ndim == rank
    return codecs.decode(name, {k: torch.from_numpy(v) for k, v in enc.items()}, calib)


def fidelity(ref, approx):
    m = codecs.FidelityMeter()
    m.update(ref, approx)
    return m.report()


def naive_int8(x):
    """One scale per token, no per-channel calibration: what the int8 codec must beat."""
    s = x.abs().amax(-1, keepdim=True) / 127
    return torch.round(x / s).clamp(-127, 127) * s


def test_fp16_and_int8_fidelity_on_real_features(feats):
    assert fidelity(feats, roundtrip("fp16", feats))["min_cosine"] > 0.9999
    r = fidelity(feats, roundtrip("int8", feats))
    assert r["min_cosine"] > 0.999 and r["max_rel_l2"] < 0.05


@pytest.mark.parametrize("factor", [10.0, 30.0])
def test_int8_survives_outlier_channels(feats, factor):
    """CLIP-like outliers: a few channels far larger (and offset) than the rest."""
    y = feats.clone()
    y[..., :3] = y[..., :3] * factor + 5 * factor
    dec = roundtrip("int8", y)
    assert fidelity(y, dec)["min_cosine"] > 0.999

    def rel_err_ordinary_channels(a):  # the precision of every *other* channel, after LayerNorm
        r, q = codecs.token_layernorm(y)[..., 3:], codecs.token_layernorm(a)[..., 3:]
        return float(((r - q).norm(dim=-1) / r.norm(dim=-1)).max())

    assert rel_err_ordinary_channels(dec) < 0.01
    assert rel_err_ordinary_channels(naive_int8(y)) > 0.03  # the failure the calibration exists to prevent


def test_int8_is_half_the_size_of_fp16(feats):
    calib = codecs.calibrate("int8", feats)
    n8 = sum(a.nbytes for a in codecs.encode("int8", feats, calib).values())
    n16 = sum(a.nbytes for a in codecs.encode("fp16", feats, None).values())
    assert n8 < 0.55 * n16


def test_decode_runs_where_the_arrays_are(feats):
    calib = codecs.calibrate("int8", feats)
    enc = {k: torch.from_numpy(v) for k, v in codecs.encode("int8", feats, calib).items()}
    out = codecs.decode("int8", enc, calib)
    assert out.dtype == torch.float32 and out.shape == feats.shape and out.device == enc["targets"].device


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown codec 'int4'"):
        codecs.check_codec("int4")
