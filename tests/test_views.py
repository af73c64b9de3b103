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


def test_replay_is_torchvision_resized_crop_and_flip(photo):
    """replay() must produce exactly the pixels torchvision's RandomResizedCrop+flip would for that box."""
    recipe = views.ViewRecipe(image_size=64, views=8, seed=3)
    params = views.sample_views("some/key", photo.height, photo.width, recipe)
    assert params[:, 4].min() == 0 and params[:, 4].max() == 1, "8 views should include both flip states"
    for p in params:
        top, left, h, w, flip, _, _ = (int(v) for v in p)
        ref = TF.resized_crop(photo, top, left, h, w, [64, 64], interpolation=TF.InterpolationMode.BICUBIC)
        if flip:
            ref = TF.hflip(ref)
        assert np.array_equal(np.asarray(views.replay(photo, p, 64)), np.asarray(ref))


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
        views.replay(photo, p, 32)


def test_no_flip_recipe_never_flips():
    a = views.sample_views("k", 100, 100, views.ViewRecipe(views=16, flip=False))
    assert (a[:, 4] == 0).all()
