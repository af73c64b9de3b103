"""The MaskDistill student: a timm ViT/BEiT backbone, a learnable mask token, a linear head (one per
teacher when several teachers are distilled at once, RADIO/Theia style: `extra_heads`).

BEiT style: the mask token *replaces* the patch embedding of every masked patch (before the
position embedding), and all tokens are encoded. We hook the backbone's `patch_embed` instead
of re-implementing `forward_features`, so every timm family that has a patch embedding followed
by blocks (vit_*, deit_*, beit*, beitv2_*, eva*) works unchanged and the backbone's state dict
keeps timm's names: `student.safetensors` loads straight into `timm.create_model(name)`.
"""
from __future__ import annotations

import torch
from torch import nn

from mdcache.errors import UserError


class StudentError(UserError):
    """The student cannot serve this cache (unknown model, wrong patch grid)."""


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, teacher_dim: int, extra_dims: tuple[int, ...] = ()):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(dim, teacher_dim)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.extra_heads = nn.ModuleList(nn.Linear(dim, d) for d in extra_dims)  # empty: no state-dict keys
        for h in self.extra_heads:
            nn.init.trunc_normal_(h.weight, std=0.02)
            nn.init.zeros_(h.bias)
        # BEiT-style models with mean pooling have no final `norm` but an `fc_norm`; apply it per token
        # so the last norm is trained and every backbone weight in the safetensors file is meaningful.
        norm = getattr(backbone, "norm", None)
        fc_norm = getattr(backbone, "fc_norm", None)
        self.token_norm = fc_norm if isinstance(norm, nn.Identity) and isinstance(fc_norm, nn.LayerNorm) else None
        self._mask: torch.Tensor | None = None
        backbone.patch_embed.register_forward_hook(self._apply_mask)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.backbone.patch_embed.grid_size)

    def _apply_mask(self, module: nn.Module, inputs, x: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            return x
        w = self._mask.to(x.dtype)
        w = w.reshape(x.shape[0], *x.shape[1:-1], 1)  # NLC, or NHWC for dynamic-size models
        return x * (1 - w) + self.mask_token.to(x.dtype).reshape(*([1] * (x.ndim - 1)), -1) * w

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """images [B,3,H,W], mask bool [B,P] -> predictions [B,P,teacher_dim] for every patch; with extra heads,
        a tuple of them, one per teacher (the same tokens through each head)."""
        self._mask = mask
        try:
            x = self.backbone.forward_features(images)
        finally:
            self._mask = None
        x = x[:, self.backbone.num_prefix_tokens:]
        if self.token_norm is not None:
            x = self.token_norm(x)
        if len(self.extra_heads):
            return (self.head(x), *(h(x) for h in self.extra_heads))
        return self.head(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full parameter names without weight decay (timm's optimizer factory also skips 1-d params)."""
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{n}" for n in inner} | {"mask_token"}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone weights in timm naming (no mask token, no distillation head)."""
        return {k: v.detach().contiguous() for k, v in self.backbone.state_dict().items()}


def build_student(name: str, *, image_size: int, grid: tuple[int, int], teacher_dim: int,
                  drop_path: float = 0.0, layer_scale: float | None = None, model_args: dict | None = None,
                  extra_dims: tuple[int, ...] = ()) -> Student:
    """A randomly initialised timm backbone (classifier removed) wrapped as a Student.

    `grid` and `teacher_dim` come from the cache manifest; a student whose patch grid differs from
    the teacher's cannot be paired token by token, so that is an error, not a resize.
    """
    import timm

    kw = {"pretrained": False, "num_classes": 0, "img_size": image_size, "drop_path_rate": drop_path,
          **{k: v for k, v in (model_args or {}).items() if k != "img_size"}}
    if layer_scale:
        kw["init_values"] = layer_scale
    try:
        backbone = timm.create_model(name, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise StudentError(f"timm has no model {name!r} (try vit_tiny_patch16_224, vit_base_patch16_224, "
                               "beitv2_base_patch16_224)") from e
        raise
    except TypeError as e:
        raise StudentError(f"student {name!r} is not a ViT/BEiT-family model timm can build at "
                           f"{image_size}px with a patch embedding: {e}") from e
    if not hasattr(backbone, "patch_embed") or not hasattr(backbone, "num_prefix_tokens"):
        raise StudentError(f"student {name!r} is not a ViT/BEiT-family model (no patch_embed)")
    student = Student(backbone, teacher_dim, tuple(extra_dims))
    if student.grid != tuple(grid):
        g = "x".join(map(str, grid))
        raise StudentError(f"student {name!r} at {image_size}px has a {'x'.join(map(str, student.grid))} patch grid, "
                           f"but the cache's teacher targets are on a {g} grid: choose a student with the same "
                           f"patch size relative to the image (e.g. patch {image_size // grid[0]}), or another cache")
    return student
