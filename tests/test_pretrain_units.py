"""Masking, student and objective: the parts of the unified view, each checked for behaviour."""
import numpy as np
import pytest
import torch
from helpers import STUDENT

from mdcache.errors import ConfigError
from mdtrain import objective
from mdtrain.masking import BlockMasker, scaled_min_patches
from mdtrain.student import StudentError, build_student


@pytest.mark.parametrize("grid,ratio,expected", [((14, 14), 75 / 196, 75), ((4, 4), 75 / 196, 6), ((14, 14), 0.6, 118),
                                                  ((7, 5), 0.4, 14)])
def test_block_mask_masks_exactly_n(grid, ratio, expected):
    masker = BlockMasker(grid, ratio)
    for seed in range(200):
        m = masker(np.random.default_rng(seed))
        assert m.shape == grid and int(m.sum()) == expected


def test_block_mask_is_blockwise_and_deterministic():
    masker = BlockMasker((14, 14))
    assert masker.min_patches == 16 and scaled_min_patches(16) == 1 and scaled_min_patches(196, 16) == 16
    # Masked patches have many masked 4-neighbours when masks are blocks (random masks: ~1.5 of 4).
    neighbours = []
    for seed in range(50):
        m = masker(np.random.default_rng(seed))
        p = np.pad(m, 1)
        n = p[:-2, 1:-1].astype(int) + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
        neighbours.append(n[m].mean())
    assert np.mean(neighbours) > 2.5
    a, b = masker(np.random.default_rng(7)), masker(np.random.default_rng(7))
    assert np.array_equal(a, b)


def test_mask_token_replaces_masked_patches():
    torch.manual_seed(0)
    s = build_student(STUDENT, image_size=64, grid=(4, 4), teacher_dim=24, drop_path=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 5, 6]] = True
    with torch.no_grad():
        out = s(x, mask)
        assert out.shape == (2, 16, 24)
        y = x.clone()
        y[:, :, 16:32, 16:32] += 5.0  # patch (1,1) = index 5: masked, its pixels must not matter
        assert torch.equal(s(y, mask), out)
        y = x.clone()
        y[:, :, 48:64, 48:64] += 5.0  # patch 15: visible, changes the prediction everywhere
        assert not torch.allclose(s(y, mask), out)
        assert not torch.allclose(s(x, torch.zeros_like(mask)), out)  # the mask token is really used


def test_student_grid_mismatch_is_a_clear_error():
    with pytest.raises(StudentError, match=r"8x8 patch grid.*4x4 grid"):
        build_student("vit_small_patch8_224", image_size=64, grid=(4, 4), teacher_dim=64)
    with pytest.raises(StudentError, match="no model"):
        build_student("vit_nonexistent_model", image_size=64, grid=(4, 4), teacher_dim=64)


def test_student_keeps_timm_names_and_no_decay_groups():
    import timm
    from timm.optim import create_optimizer_v2

    s = build_student(STUDENT, image_size=64, grid=(4, 4), teacher_dim=64)
    ref = timm.create_model(STUDENT, img_size=64).state_dict()
    assert set(ref) - set(s.backbone_state_dict()) == {"head.weight", "head.bias"}
    assert set(s.backbone_state_dict()) <= set(ref)
    opt = create_optimizer_v2(s, opt="adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(s.named_parameters())
    for name in ("mask_token", "backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "head.bias",
                 "backbone.blocks.0.attn.qkv.bias"):
        assert id(named[name]) in no_decay, name
    assert id(named["backbone.blocks.0.attn.qkv.weight"]) not in no_decay
    assert id(named["head.weight"]) not in no_decay


def test_beitv2_student_builds_and_trains_its_final_norm():
    s = build_student("beitv2_base_patch16_224", image_size=32, grid=(2, 2), teacher_dim=8, drop_path=0.0)
    out = s(torch.randn(1, 3, 32, 32), torch.tensor([[True, False, False, True]]))
    out.sum().backward()
    assert out.shape == (1, 4, 8) and s.backbone.fc_norm.weight.grad is not None  # fc_norm applied per token
    assert s.mask_token.grad is not None


def test_objective_uses_masked_tokens_only():
    torch.manual_seed(0)
    pred, tgt = torch.randn(2, 16, 8), torch.randn(2, 16, 8) * 3 + 1
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    for loss in objective.LOSSES:
        for norm in objective.TARGET_NORMS:
            base = objective.masked_feature_loss(pred, tgt, mask, target_norm=norm, loss=loss)
            p2 = pred.clone()
            p2[~mask] += 10  # unmasked predictions do not count
            assert torch.equal(objective.masked_feature_loss(p2, tgt, mask, target_norm=norm, loss=loss), base)
            p3 = pred.clone()
            p3[mask] += 1
            assert not torch.equal(objective.masked_feature_loss(p3, tgt, mask, target_norm=norm, loss=loss), base)
    ln = torch.nn.functional.layer_norm(tgt, (8,), eps=1e-6)  # layernorm target: per token, no affine
    assert torch.allclose(objective.masked_feature_loss(ln, tgt, mask, loss="mse"), torch.tensor(0.0), atol=1e-10)
    ref = torch.nn.functional.smooth_l1_loss(pred[mask], ln[mask], beta=2.0)
    assert torch.allclose(objective.masked_feature_loss(pred, tgt, mask, beta=2.0), ref)
    with pytest.raises(ConfigError, match="--loss"):
        objective.check("layernorm", "l3")
    with pytest.raises(ConfigError, match="--target-norm"):
        objective.check("batchnorm", "mse")


def test_student_normalization_is_timms_imagenet_default():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from mdtrain import data

    assert data.STUDENT_MEAN == tuple(IMAGENET_DEFAULT_MEAN) and data.STUDENT_STD == tuple(IMAGENET_DEFAULT_STD)


@pytest.mark.parametrize("loss", ["mse", "smooth_l1"])
def test_online_targets_can_be_saved_for_backward(loss):
    """The teacher ran under inference_mode: online, with --target-norm none, mse and smooth_l1 save the
    targets for backward, and an inference tensor cannot be saved ("Inference tensors cannot be saved")."""
    from helpers import TINY_TEACHER

    from mdcache.teachers import load_teacher, run_teacher

    teacher = load_teacher(TINY_TEACHER, random_init=True, image_size=64)
    targets = run_teacher(teacher, torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    pred = torch.randn(targets.shape, requires_grad=True)
    mask = torch.zeros(targets.shape[:2], dtype=torch.bool)
    mask[:, :5] = True
    objective.masked_feature_loss(pred, targets, mask, target_norm="none", loss=loss).backward()
    assert pred.grad is not None and pred.grad[:, 5:].abs().sum() == 0 and pred.grad[:, :5].abs().sum() > 0
