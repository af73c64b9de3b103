"""Codec fidelity on real teacher features (tiny real open_clip ViT, random init, real photos)."""
import numpy as np
import pytest
import torch
from helpers import TINY_TEACHER

from mdcache import codecs, store, teachers
from mdcache.errors import ConfigError
from mdcache.extract import image_views
from mdcache.sources import iter_samples, list_source
from mdcache.views import ViewRecipe


@pytest.fixture(scope="module")
def feats(train_spec) -> torch.Tensor:
    t = teachers.load_teacher(TINY_TEACHER, random_init=True, image_size=64)
    recipe = ViewRecipe(image_size=64, views=2)
    xs = [image_views(s, recipe, t.mean, t.std)[0] for _, s in zip(range(16), iter_samples(list_source(train_spec)[0]))]
    return teachers.run_teacher(t, torch.cat(xs))


def calibrate(name, x):
    c = codecs.CODECS[name]
    return c.calibrate(x) if c.calibrate else None


def roundtrip(name, x, calib_from=None):
    c = codecs.CODECS[name]
    calib = calibrate(name, (calib_from if calib_from is not None else x)[:8])
    enc = c.encode(x, calib)
    assert set(enc) == set(c.arrays)
    for a, (dtype, rank) in c.arrays.items():
        assert enc[a].dtype == np.dtype(dtype) and enc[a].ndim == rank
    return c.decode({k: torch.from_numpy(v) for k, v in enc.items()}, calib)


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
    calib = calibrate("int8", feats)
    n8 = sum(a.nbytes for a in codecs.CODECS["int8"].encode(feats, calib).values())
    n16 = sum(a.nbytes for a in codecs.CODECS["fp16"].encode(feats, None).values())
    assert n8 < 0.55 * n16


def test_decode_runs_where_the_arrays_are(feats):
    calib = calibrate("int8", feats)
    enc = {k: torch.from_numpy(v) for k, v in codecs.CODECS["int8"].encode(feats, calib).items()}
    out = codecs.CODECS["int8"].decode(enc, calib)
    assert out.dtype == torch.float32 and out.shape == feats.shape and out.device == enc["targets"].device


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown codec 'int4'; choose one of fp16, int8"):
        codecs.get_codec("int4")


def test_codec_identities_are_frozen():
    """The identity dicts are hashed into every cache id: changing one orphans every existing cache."""
    fp = {"format_version": 1, "codec": codecs.CODECS["fp16"].identity}
    i8 = {"format_version": 1, "codec": codecs.CODECS["int8"].identity}
    assert store.cache_id(fp) == "42e8363c2b4a50b7" and store.cache_id(i8) == "353b1adf5acacdd2"
