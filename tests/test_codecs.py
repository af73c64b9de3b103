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
    xs = [image_views(s, recipe)[0] for _, s in zip(range(16), iter_samples(list_source(train_spec)[0]))]
    return teachers.run_teacher(t, torch.cat(xs))


def calibrate(name, x):
    c = codecs.get_codec(name)
    return c.calibrate(x) if c.calibrate else None


def roundtrip(name, x, calib_from=None, n_calib=8):
    c = codecs.get_codec(name)
    calib = calibrate(name, (calib_from if calib_from is not None else x)[:n_calib])
    enc = c.encode(x, calib)
    shapes = c.shapes(x.shape[1], x.shape[2])
    assert set(enc) == set(shapes)
    for a, (dtype, shape) in shapes.items():
        assert enc[a].dtype == np.dtype(dtype) and enc[a].shape == (len(x), *shape)
    assert sum(a.nbytes for a in enc.values()) == len(x) * x.shape[1] * c.bytes_per_token(x.shape[2])
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
    n8 = sum(a.nbytes for a in codecs.get_codec("int8").encode(feats, calib).values())
    n16 = sum(a.nbytes for a in codecs.get_codec("fp16").encode(feats, None).values())
    assert n8 < 0.55 * n16


def test_decode_runs_where_the_arrays_are(feats):
    calib = calibrate("int8", feats)
    enc = {k: torch.from_numpy(v) for k, v in codecs.get_codec("int8").encode(feats, calib).items()}
    out = codecs.get_codec("int8").decode(enc, calib)
    assert out.dtype == torch.float32 and out.shape == feats.shape and out.device == enc["targets"].device


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown codec 'int2'; choose one of fp16, int8, int4, pca:R"):
        codecs.get_codec("int2")
    with pytest.raises(ConfigError, match="say how many components, e.g. pca:192"):
        codecs.get_codec("pca")
    with pytest.raises(ConfigError, match="between 1 and"):
        codecs.get_codec("pca:32").shapes(16, 32)  # R must be below the teacher's channels
    with pytest.raises(ConfigError, match="channels are odd"):
        codecs.get_codec("int4").shapes(16, 33)
    for odd_spelling in ("pca:016", "pca:²", "pca:-4"):  # one spelling per codec: one cache id, one manifest name
        with pytest.raises(ConfigError, match="say how many components"):
            codecs.get_codec(odd_spelling)


def test_codec_identities_are_frozen():
    """The identity dicts are hashed into every cache id: changing one orphans every existing cache."""
    fp = {"format_version": 1, "codec": codecs.get_codec("fp16").identity}
    i8 = {"format_version": 1, "codec": codecs.get_codec("int8").identity}
    assert store.cache_id(fp) == "42e8363c2b4a50b7" and store.cache_id(i8) == "353b1adf5acacdd2"


def test_int4_packs_two_codes_per_byte_and_keeps_token_fidelity(feats):
    """Half of int8's bytes; the levels and the per-token scale keep every token close after LayerNorm."""
    dec = roundtrip("int4", feats)
    r = fidelity(feats, dec)
    assert r["mean_cosine"] > 0.99 and r["min_cosine"] > 0.95, r
    d = feats.shape[-1]
    assert codecs.get_codec("int4").bytes_per_token(d) == d // 2 + 2 < 0.27 * 2 * d
    # the levels are fitted to the data: fewer than 16 uniform steps would do worse
    calib = calibrate("int4", feats[:8])
    levels = np.array(calib["levels"])
    assert len(levels) == 16 and np.all(np.diff(levels) > 0) and not np.allclose(np.diff(levels), np.diff(levels)[0])


@pytest.mark.parametrize("shape", ["tiny teacher", "CLIP-B/16"])
def test_int4_on_a_cpu_is_the_torch_encoder_in_one_pass(feats, shape, monkeypatch):
    """The numba encoder (one pass per token and candidate scale) stores what the torch encoder stores: the
    same scales and codes on real tiny-teacher features and on CLIP-B/16-shaped ones with outlier channels."""
    from mdcache import int4_cpu

    if not int4_cpu.available():
        pytest.fail("numba is missing (it is installed with ffcv): the int4 CPU encoder cannot run")
    g = torch.Generator().manual_seed(0)
    x = feats if shape == "tiny teacher" else (
        torch.randn(4, 196, 768, generator=g) * torch.rand(768, generator=g) * 3 + torch.randn(768, generator=g))
    c = codecs.get_codec("int4")
    calib = c.calibrate(x[:2].reshape(-1, x.shape[-1]))
    fast = c.encode(x, calib)
    monkeypatch.setenv("MDCACHE_INT4_TORCH", "1")
    slow = c.encode(x, calib)
    assert fast.keys() == slow.keys() and all(fast[k].dtype == slow[k].dtype for k in fast)
    # Sums run in another order than torch's, so a rare token's rms can fall on the other side of an fp16
    # rounding tie (seen: rms exactly between two fp16 numbers) or two candidates' errors tie: that token's
    # scale, hence its codes, differ. At most one token in a thousand (or one); every other token's codes equal.
    same = fast["scales"] == slow["scales"]
    assert (~same).sum() <= max(1, 0.001 * same.size)
    assert (fast["targets"][same] == slow["targets"][same]).mean() > 0.9999
    ref = fidelity(x, c.decode({k: torch.from_numpy(v) for k, v in slow.items()}, calib))
    got = fidelity(x, c.decode({k: torch.from_numpy(v) for k, v in fast.items()}, calib))
    assert got["mean_rel_l2"] == pytest.approx(ref["mean_rel_l2"], rel=1e-3)


def test_int4_on_a_cpu_codes_extreme_values_as_torch_does(monkeypatch):
    """A value beyond the table's range (an outlier channel, inf) gets the top or bottom code, as bucketize
    gives it: the cell index is clamped before it becomes an integer, where an overflow made it code 0."""
    c = codecs.get_codec("int4")
    x = torch.randn(2, 4, 8)
    calib = c.calibrate(x.reshape(-1, 8))
    x[0, 0, :4] = torch.tensor([1e30, -1e30, 3e5, 7.0])
    x[1, 0, 0] = float("inf")  # (a token with inf or NaN goes to the torch encoder)
    fast = c.encode(x, calib)
    monkeypatch.setenv("MDCACHE_INT4_TORCH", "1")
    slow = c.encode(x, calib)
    assert np.array_equal(fast["targets"], slow["targets"]) and np.array_equal(fast["scales"], slow["scales"])
    assert fast["targets"][0, 0, 0] & 15 == 15 and fast["targets"][0, 0, 0] >> 4 == 0


def test_int4_nibbles_are_low_channel_first(feats):
    """The format doc's decoding rule, checked on the bytes: channel 2i is the low nibble of byte i."""
    c = codecs.get_codec("int4")
    calib = calibrate("int4", feats[:8])
    enc = c.encode(feats[:2], calib)
    codes = np.stack([enc["targets"] & 15, enc["targets"] >> 4], -1).reshape(2, feats.shape[1], -1)
    levels, std, mean = (np.array(calib[k], np.float32) for k in ("levels", "std", "mean"))
    plain = levels[codes] * enc["scales"].astype(np.float32)[..., None] * std + mean
    dec = c.decode({k: torch.from_numpy(v) for k, v in enc.items()}, calib)
    assert np.allclose(plain, dec.numpy(), atol=1e-5)


def test_pca_keeps_the_features_layernorm_sees(feats):
    d = feats.shape[-1]
    calib = calibrate(f"pca:{d // 2}", feats[:8])
    assert calib["basis"].shape == (d // 2, d) and calib["basis"].dtype == np.float32
    ev = calib["explained_variance_curve"]
    assert list(map(float, ev.values())) == sorted(map(float, ev.values())) and calib["explained_variance"] <= 1
    assert np.allclose(calib["basis"] @ calib["basis"].T, np.eye(d // 2), atol=1e-4)  # orthonormal rows
    dec = roundtrip(f"pca:{d // 2}", feats, n_calib=None)
    r = fidelity(feats, dec)
    assert r["mean_cosine"] > 0.98, r
    # the token's own mean and spread are kept: decoding returns features, not normalized ones
    assert torch.allclose(dec.mean(-1), feats.mean(-1), atol=1e-2 * float(feats.std()))
    # more components, closer
    assert fidelity(feats, roundtrip(f"pca:{d // 8}", feats, n_calib=None))["mean_cosine"] < r["mean_cosine"]


def test_per_token_scalars_stay_finite_in_fp16():
    """Scales are stored in fp16: a nearly constant calibration channel (int4) or a rank-deficient basis (pca)
    must not turn a token into inf, or silently into the calibration mean."""
    calib_tokens = torch.randn(4, 16, 32)
    calib_tokens[..., 0] = 1.0 + 1e-9 * torch.randn(4, 16)  # constant while calibrating
    x = torch.randn(2, 16, 32)
    x[..., 0] = 50.0  # ...and not afterwards
    for name, cal in (("int4", calib_tokens), ("pca:8", calib_tokens[:1, :3])):  # 3 tokens for 8 components
        c = codecs.get_codec(name)
        calib = c.calibrate(cal)
        enc = c.encode(x, calib)
        dec = c.decode({k: torch.from_numpy(v) for k, v in enc.items()}, calib)
        assert torch.isfinite(dec).all(), name
        assert all(np.isfinite(v.astype(np.float32)).all() for v in enc.values()), name


def test_codecs_are_made_once_and_a_calibration_keeps_nothing_alive():
    """get_codec runs on every read and decode: one object per name. calibrate_on once carried get_codec's
    cache by mistake and kept every feature generator (its shard file open) and the teacher alive."""
    import gc
    import weakref

    assert codecs.get_codec("pca:4") is codecs.get_codec("pca:4")

    def batches():
        yield 4, torch.randn(4, 3, 16)
    gen = batches()
    alive = weakref.ref(gen)
    assert codecs.calibrate_on("int8", gen, 4, lambda: AssertionError("no batch")) is not None
    del gen
    gc.collect()
    assert alive() is None
