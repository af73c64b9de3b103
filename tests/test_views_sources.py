import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image

from mdcache import views
from mdcache.sources import iter_samples, list_source


@pytest.fixture(scope="module")
def photo(train_spec) -> Image.Image:
    sample = next(iter_samples(list_source(train_spec)[0]))
    return views.decode_image(sample.data)


def test_pil_replay_is_torchvision_resized_crop_and_flip(photo):
    """The PIL replay (caches made before 0.2) produces exactly torchvision's RandomResizedCrop+flip on PIL."""
    recipe = views.ViewRecipe(image_size=64, views=8, seed=3)
    params = views.sample_views("some/key", photo.height, photo.width, recipe)
    assert params[:, 4].min() == 0 and params[:, 4].max() == 1, "8 views should include both flip states"
    for p in params:
        top, left, h, w, flip = (int(v) for v in p[:5])
        ref = TF.resized_crop(photo, top, left, h, w, [64, 64], interpolation=TF.InterpolationMode.BICUBIC)
        if flip:
            ref = TF.hflip(ref)
        assert np.array_equal(np.asarray(views.replay(photo, p, 64, views.REPLAY_PIL)), np.asarray(ref))


def test_tensor_replay_is_torchvision_resized_crop_and_flip_on_uint8_tensors(photo):
    """The tensor replay is torchvision's tensor RandomResizedCrop (antialiased bicubic on uint8) + flip."""
    import torch
    from torchvision.transforms.v2 import functional as F2

    recipe = views.ViewRecipe(image_size=64, views=8, seed=3)
    params = views.sample_views("some/key", photo.height, photo.width, recipe)
    x = views.image_tensor(photo)
    for p, got in zip(params, views.view_pixels(photo, params, 64, views.REPLAY_TENSOR)):
        top, left, h, w, flip = (int(v) for v in p[:5])
        ref = F2.resized_crop(x, top, left, h, w, [64, 64], interpolation=F2.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(got, F2.horizontal_flip(ref) if flip else ref)
        assert torch.equal(got, views.view_pixels(photo, p, 64, views.REPLAY_TENSOR))  # one view = in a batch
        assert np.array_equal(np.asarray(views.replay(photo, p, 64, views.REPLAY_TENSOR)), got.permute(1, 2, 0).numpy())


def test_tensor_replay_stays_close_to_the_pil_replay(photo):
    """A new implementation is a new name (other pixels), but the same picture: stated tolerances against PIL."""
    import torch

    for jitter, mean_tol, p99_tol in ((0.0, 0.2, 1), (0.4, 1.5, 4)):
        recipe = views.ViewRecipe(image_size=96, views=16, seed=1, color_jitter=jitter)
        params = views.sample_views("k", photo.height, photo.width, recipe)
        t = views.view_pixels(photo, params, 96, views.REPLAY_TENSOR).int()
        p = views.view_pixels(photo, params, 96, views.REPLAY_PIL).int()
        diff = (t - p).abs().float()
        assert diff.mean() < mean_tol and torch.quantile(diff.flatten()[::7], 0.99) <= p99_tol, (jitter, diff.mean())


def test_the_gpu_form_of_the_tensor_replay_equals_the_cpu_form(photo):
    """A GPU has no uint8 resize kernel: it runs the same resize in float32 with the uint8 rounding between the
    two passes. Both forms run here on the CPU: within 2 levels, and 99% of pixels identical (the GPU check
    compares them on a real GPU)."""

    recipe = views.ViewRecipe(image_size=64, views=8, seed=2)
    x = views.image_tensor(photo)
    for p in views.sample_views("k", photo.height, photo.width, recipe):
        top, left, h, w = (int(v) for v in p[:4])
        crop = x[None, :, top:top + h, left:left + w]
        a, b = views.resize_aa(crop, 64).int(), views.resize_aa_float(crop, 64).int()
        assert (a - b).abs().max() <= 2 and (a == b).float().mean() >= 0.99


def test_views_deterministic_per_key_and_seed_and_in_bounds():
    r = views.ViewRecipe(image_size=32, views=4, seed=0)
    a = views.sample_views("k1", 300, 200, r)
    assert np.array_equal(a, views.sample_views("k1", 300, 200, r))
    assert not np.array_equal(a, views.sample_views("k2", 300, 200, r))
    assert not np.array_equal(a, views.sample_views("k1", 300, 200, views.ViewRecipe(image_size=32, views=4, seed=1)))
    top, left, h, w = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 200).all()
    area = h * w / (300 * 200)
    assert (area >= 0.2 - 0.02).all() and (area <= 1.0).all()
    assert (a[:, 5] == 300).all() and (a[:, 6] == 200).all()


def test_replay_refuses_an_image_of_another_size(photo):
    p = views.sample_views("k", photo.height + 1, photo.width, views.ViewRecipe(views=1))[0]
    with pytest.raises(ValueError, match="source changed"):
        views.replay(photo, p, 32, views.REPLAY_PIL)
    with pytest.raises(ValueError, match="source changed"):
        views.view_pixels(photo, p, 32, views.REPLAY_TENSOR)
    with pytest.raises(Exception, match="unknown view replay 'pil-v9'"):
        views.view_pixels(photo, p, 32, "pil-v9")


def test_no_flip_recipe_never_flips():
    a = views.sample_views("k", 100, 100, views.ViewRecipe(views=16, flip=False))
    assert (a[:, 4] == 0).all()


def test_color_jitter_is_stored_and_replayed_like_torchvision(photo):
    """OPEN point in MaskDistill: jitter off by default; when on, its factors and order are view params."""
    off = views.sample_views("k", photo.height, photo.width, views.ViewRecipe(views=4))
    assert (off[:, 7:10] == views.JITTER_SCALE).all() and (off[:, 10] == 0).all()
    recipe = views.ViewRecipe(image_size=48, views=6, color_jitter=0.4)
    on = views.sample_views("k", photo.height, photo.width, recipe)
    factors = on[:, 7:10] / views.JITTER_SCALE
    assert (factors >= 0.6 - 1e-6).all() and (factors <= 1.4 + 1e-6).all() and len(set(on[:, 10])) > 1
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for p in on:
        ref = TF.resized_crop(photo, int(p[0]), int(p[1]), int(p[2]), int(p[3]), [48, 48],
                              interpolation=TF.InterpolationMode.BICUBIC)
        if p[4]:
            ref = TF.hflip(ref)
        for i in views.JITTER_ORDERS[p[10]]:
            ref = fns[i](ref, float(p[7 + i]) / views.JITTER_SCALE)
        assert np.array_equal(np.asarray(views.replay(photo, p, 48, views.REPLAY_PIL)), np.asarray(ref))
    # the stored factors are what makes the difference: the same crop without them gives other pixels
    for impl in views.REPLAYS:
        assert not np.array_equal(np.asarray(views.replay(photo, on[0], 48, impl)),
                                  np.asarray(views.replay(photo, np.r_[on[0][:7], off[0][7:]], 48, impl)))


def test_source_specs_brace_alternatives_and_comma_lists(demo_data):
    from mdcache.sources import SourceError

    d = str(demo_data)
    names = lambda spec: [s.name for s in list_source(spec)]  # noqa: E731
    assert names(f"{d}/{{train-000000,val-000000}}.tar") == ["train-000000", "val-000000"]
    both = names(f"{d}/train-{{000000..000001}}.tar,{d}/val-000000.tar")
    assert both == ["train-000000", "train-000001", "val-000000"]
    assert names(f"{d}/train-00000[23].tar") == ["train-000002", "train-000003"]
    with pytest.raises(SourceError, match="2 source shards do not exist: .*train-000008.tar.*train-000009.tar"):
        list_source(f"{d}/train-{{000008..000009}}.tar")


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    """Pillow's I;16 -> RGB clips at 255: a 16-bit PNG came out almost all white in every stage."""
    import io

    import numpy as np

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")  # really a 16-bit PNG
    rgb = np.asarray(views.decode_image(buf.getvalue()))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 1]).all()
    expected = np.round(ramp / 65535.0 * 255.0).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert (rgb[..., 0] == 255).mean() < 0.01  # not "almost all white"


def test_source_reads_on_a_bucket_get_the_storage_timeouts():
    """Source shards on S3 were opened with fsspec directly, without the timeouts and bounded retries every
    other bucket read gets: a hung server stalled a trainer for minutes. One opener now serves both."""
    from mdcache import sources

    fs, path = sources.open_fs("s3://team/data/train-000000.tar", {"endpoint_url": "http://127.0.0.1:9", "anon": True})
    assert path == "team/data/train-000000.tar"
    assert fs.config_kwargs["read_timeout"] == 30.0 and fs.config_kwargs["retries"]["max_attempts"] == 1


def test_the_gpu_batches_flips_and_jitter_as_the_cpu_replays_each_view(photo):
    """On a GPU the whole batch is flipped and jittered in a few kernels (per view, launches would dominate).
    Run here on the CPU: flips exact, jitter within one level on a few pixels (the contrast's mean grey level
    is summed in another order), and with no jitter every pixel equal."""
    import torch

    x = views.image_tensor(photo)
    for jitter in (0.0, 0.4, 0.8):
        recipe = views.ViewRecipe(image_size=64, views=16, seed=3, color_jitter=jitter)
        params = [views.sample_views(k, photo.height, photo.width, recipe) for k in ("a", "b", "c")]
        assert all(p[:, 4].any() and not p[:, 4].all() for p in params)  # flipped and not, in every image
        each = torch.cat([views.view_pixels(x, p, 64, views.REPLAY_TENSOR) for p in params]).int()
        batched = views._replay_batched([x, x, x], params, 64).int()
        diff = (each - batched).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (jitter, diff.max(), (diff > 0).float().mean())
        if jitter == 0:
            assert diff.max() == 0
