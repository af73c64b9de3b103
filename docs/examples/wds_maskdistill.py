"""MaskDistill in plain PyTorch + timm, fed by a teacher cache through WebDataset: no mdtrain, no teacher.

    python docs/examples/wds_maskdistill.py ./cache/<cache-id> 'shards/train-{000000..000009}.tar' --epochs 2
"""
import argparse

import numpy as np
import timm
import torch
import torch.nn.functional as F
import webdataset as wds

import mdcache
from mdcache.wds import with_targets

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # the student's inputs


class MaskedStudent(torch.nn.Module):
    """A timm ViT whose masked patches are replaced by a learned token; a linear head predicts teacher features."""

    def __init__(self, name: str, teacher_dim: int, img_size: int):
        super().__init__()
        self.vit = timm.create_model(name, img_size=img_size, num_classes=0)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, self.vit.embed_dim))
        self.head = torch.nn.Linear(self.vit.embed_dim, teacher_dim)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # mask: bool [B, P], True = hidden
        x = self.vit.patch_embed(images)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = self.vit.norm(self.vit.blocks(self.vit._pos_embed(x)))
        return self.head(x[:, self.vit.num_prefix_tokens:])


def masked_loss(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Smooth-L1 to the per-token LayerNorm of the teacher's features, on masked patches only."""
    t = targets[mask]
    return F.smooth_l1_loss(pred[mask], F.layer_norm(t, t.shape[-1:], eps=1e-6), beta=beta)


def to_pair(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.from_numpy(np.asarray(sample["mdcache.image"]).copy()).permute(2, 0, 1).float() / 255
    return (image - MEAN[:, None, None]) / STD[:, None, None], sample["mdcache.targets"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("cache"), p.add_argument("shards")
    p.add_argument("--student", default="vit_tiny_patch16_224")
    p.add_argument("--epochs", type=int, default=1), p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-4), p.add_argument("--mask-ratio", type=float, default=0.4)
    a = p.parse_args()
    cache = mdcache.open_cache(a.cache)
    student = MaskedStudent(a.student, cache.teacher_dim, cache.image_size)
    assert student.vit.patch_embed.num_patches == cache.patch_grid[0] * cache.patch_grid[1], "student/teacher grid"
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.05)
    torch.manual_seed(0)
    for epoch in range(a.epochs):
        ds = (wds.WebDataset(a.shards, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
              .compose(with_targets(cache, epoch=epoch)).shuffle(256).map(to_pair).batched(a.batch_size))
        for step, (images, targets) in enumerate(wds.WebLoader(ds, batch_size=None, num_workers=2)):
            mask = torch.rand(targets.shape[:2]).argsort(1) < int(a.mask_ratio * targets.shape[1])
            loss = masked_loss(student(images, mask), targets, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
