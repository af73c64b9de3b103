"""`mdcache show`: the picture a person looks at, drawn from a real cache and its teacher."""
from __future__ import annotations

import numpy as np
import torch
from helpers import run_cli, shared_cache
from PIL import Image

from mdcache.show import targets_to_rgb


def test_show_draws_views_masks_targets_and_the_fidelity_histogram(tmp_path_factory, train_spec, tmp_path):
    url = shared_cache(tmp_path_factory, train_spec)
    p = run_cli("show", url, "--out", str(tmp_path / "views.png"), "--n", "3")
    assert "wrote" in p.stderr and "no fidelity histogram" not in p.stderr  # random-init: the teacher is rebuilt
    with Image.open(tmp_path / "views.png") as im:
        assert im.width > 600 and im.height > 3 * 200  # three sample rows and the histogram
        assert len(np.unique(np.asarray(im.convert("L")))) > 50  # pictures, not an empty canvas


def test_targets_to_rgb_gives_equal_features_equal_colours():
    torch.manual_seed(0)
    t = torch.randn(2, 16, 32)
    t[1, 5] = t[0, 3] * 3 + 1  # the same feature after LayerNorm
    rgb = targets_to_rgb(t, (4, 4))
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert np.allclose(rgb[1, 1, 1], rgb[0, 0, 3], atol=1e-5)
