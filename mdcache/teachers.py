"""Teachers by spec string, and the feature tap that turns an image batch into patch targets.

    clip-b16                  open_clip ViT-B-16, OpenAI weights (MaskDistill's teacher)
    clip-l14                  open_clip ViT-L-14, OpenAI weights
    open_clip:ARCH[:TAG]      any open_clip architecture (ARCH may be a model-config .json file)
    timm:MODEL_NAME           any timm ViT, or a timm CNN: the cells of its last feature map are the tokens
                              (a 224 px ResNet gives a 7x7 grid of 512-2048 channels)

Taps: `final` (last block output, patch tokens, before ln_post; MaskDistill default),
`ln_post` (after the final norm), `proj` (after ln_post and the CLIP projection; BEiT v2's choice).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, NamedTuple

from .devices import autocast
from .errors import TeacherError
from .lazy import lazy
from .views import normalize
from .weights import read_metadata, read_state_dict

if TYPE_CHECKING:
    from torch import nn

torch = lazy("torch")  # the registry below is read without torch (`mdcache plan`)


class NamedTeacher(NamedTuple):
    """A teacher with a short name: its spec, and its shape at the default tap `final` and 224 px."""

    spec: str
    tokens: int
    dim: int


NAMED = {"clip-b16": NamedTeacher("open_clip:ViT-B-16:openai", 196, 768),  # MaskDistill's teacher
         "clip-l14": NamedTeacher("open_clip:ViT-L-14:openai", 256, 1024)}
ALIASES = {name: t.spec for name, t in NAMED.items()}
TAPS = ("final", "ln_post", "proj")
DEFAULT_IMAGE_SIZE = 224  # a teacher's input size when neither --image-size nor its weights say
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """'clip-b16' | 'open_clip:ARCH[:TAG]' | 'timm:NAME' -> (family, arch, pretrained tag)."""
    spec = ALIASES.get(spec, spec)
    family, _, rest = spec.partition(":")
    if family not in FAMILIES or not rest:
        raise TeacherError(f"unknown teacher {spec!r}; use {', '.join(ALIASES)}, open_clip:ARCH[:PRETRAINED] or "
                           f"timm:MODEL")
    if family == "open_clip":
        arch, _, tag = rest.partition(":")
        return family, arch, tag or None
    return family, rest, None


def weights_digest(model: nn.Module) -> str:
    """Content hash of the weights: a cache records *which* teacher, not just its name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too (BatchNorm)
    return h.hexdigest()[:32]


def hub_offline() -> bool:
    """True when the Hugging Face Hub cannot answer: offline mode is set, or its host refuses a connection
    within 3 s. Then offline mode is switched on, so weights already in the local cache still load and
    missing ones fail at once instead of after a minute of retries."""
    import socket
    from urllib.parse import urlparse

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3).close()
        except OSError:
            offline = True
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import huggingface_hub.constants

            huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at import time: set it where it is used
        except ImportError:
            pass
    return offline


@contextlib.contextmanager
def quiet_hub():
    """The hub's and open_clip's own warnings repeat what the one error below says: keep them out."""
    import logging

    old = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(old)


def _missing_weights(spec: str, what: str, err: Exception) -> TeacherError:
    where = (f"the Hugging Face Hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is unreachable or "
             "offline mode is set, and they are not in the local cache (HF_HOME)") if hub_offline() else \
        f"{type(err).__name__}: {str(err)[:300]}"
    return TeacherError(
        f"teacher {spec!r}: could not load {what} ({where}).\n"
        "Provide the weights one of these ways:\n"
        "  --teacher-weights PATH   a local checkpoint (.safetensors, .bin or .pt state dict) for this architecture\n"
        "  a populated Hugging Face cache (HF_HOME) copied from a machine with access, used offline\n"
        "(docs/quickstart.md, 'Teacher weights': one command turns open_clip's weights into a --teacher-weights "
        "file.)\n"
        "Use --random-init only for tests and demos (recorded in the cache fingerprint).")


@dataclass
class TeacherParts:
    """What a family builder returns: the frozen-to-be model and how to tap it."""

    model: nn.Module
    features: Callable[[torch.Tensor], torch.Tensor]  # normalized images [B,3,H,W] -> [B, P, D]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    patch_grid: tuple[int, int]
    dim: int


@dataclass
class Teacher(TeacherParts):
    """A built teacher: its parts, the spec that named it, and what goes into the cache fingerprint."""

    spec: str
    identity: dict

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Strict load of a weights file's state dict; a mismatch names the file and the keys."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        why = str(e).splitlines()[-1].strip()
        raise TeacherError(f"--teacher-weights {path}: does not fit this teacher: {why}") from None
    if missing or unexpected:
        raise TeacherError(f"--teacher-weights {path}: does not fit this teacher: missing keys {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}")


def _open_clip(spec: str, arch: str, tag: str | None, state: dict | None, path: str | None, random_init: bool,
               tap: str, image_size: int | None, model_args: dict) -> TeacherParts:
    import open_clip

    if model_args:
        raise TeacherError(f"teacher {spec!r}: model arguments are for timm teachers (open_clip takes a model config "
                           ".json as ARCH)")

    if arch.endswith(".json"):
        if not os.path.exists(arch):
            raise TeacherError(f"open_clip model config {arch!r} does not exist")
        open_clip.add_model_config(arch)
        arch = os.path.basename(arch)[:-5]
    if arch not in open_clip.list_models():
        raise TeacherError(f"open_clip has no architecture {arch!r} (see open_clip.list_models())")
    kw = {"force_image_size": image_size} if image_size else {}
    if state is None and not random_init and not tag:
        raise TeacherError(f"teacher {spec!r} names no weights: pass --teacher-weights PATH or --random-init")
    pretrained = tag if state is None and not random_init else None  # a named tag: open_clip's own (hub) loader
    if pretrained:
        hub_offline()
    try:
        with quiet_hub():
            model = open_clip.create_model(arch, pretrained=pretrained, **kw)
    except Exception as e:
        raise _missing_weights(spec, f"weights {pretrained!r}", e) from e
    if state is not None:
        _load_open_clip(model, state, path)
    visual = model.visual
    del model
    if tap == "final":
        def features(x):
            return visual.forward_intermediates(x, indices=1, intermediates_only=True,
                                                output_fmt="NLC")["image_intermediates"][0]
        dim = visual.transformer.width
    elif tap in ("ln_post", "proj"):
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            raise TeacherError(f"teacher {spec!r}: tap {tap!r} needs a plain CLS-pooled ViT")
        visual.output_tokens = True

        def features(x):
            tokens = visual(x)[1]
            return tokens @ visual.proj if tap == "proj" else tokens
        dim = visual.proj.shape[1] if tap == "proj" else visual.transformer.width
    else:
        raise TeacherError(f"unknown tap {tap!r}; choose one of {', '.join(TAPS)}")
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
    return TeacherParts(visual, features, mean, std, int(size), tuple(visual.grid_size), int(dim))


def _load_open_clip(model: nn.Module, state: dict, path: str) -> None:
    """A full CLIP state dict (what open_clip saves), or the vision tower's alone; massaged as
    open_clip's own load_checkpoint does (text layout, logit shapes, position-embedding resize)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    if not any(k.startswith("visual.") for k in state):  # vision tower only
        state = {f"visual.{k}": v for k, v in state.items()}
        resize_pos_embed(state, model)
        load_into(model.visual, {k[len("visual."):]: v for k, v in state.items()}, path)
        return
    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        if key in state and getattr(model, key, None) is not None and model.get_parameter(key).ndim != state[key].ndim:
            state[key] = state[key].reshape(model.get_parameter(key).shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    load_into(model, state, path)


def weights_preprocessing(path: str | None) -> dict:
    """What a weights file says about how it was trained (mdtrain writes it): the input normalization
    (`mean`, `std`), the input size (`image_size`) and the model's arguments (`model_args`, `global_pool`). A
    teacher must be fed the inputs it learned on: a model trained with ImageNet's mean/std and fed timm's
    default 0.5/0.5 sees 0.46x the contrast, and a CNN trained on 28 px images and fed 224 px views sees
    shapes eight times larger than any it learned: its targets are those of another function."""
    meta = read_metadata(path) if path else {}
    out: dict = {}
    try:
        if "mean" in meta and "std" in meta:
            out["mean"], out["std"] = tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
        args = json.loads(meta.get("model_args") or "{}")
    except ValueError as e:
        raise TeacherError(f"--teacher-weights {path}: its metadata is not valid JSON ({e})") from None
    if meta.get("global_pool"):
        args["global_pool"] = meta["global_pool"]
    if str(meta.get("image_size", "")).isdigit():
        out["image_size"] = int(meta["image_size"])
    out["model_args"] = {k: v for k, v in args.items() if k != "img_size"}  # the input size: `image_size`
    return out


def _timm(spec: str, name: str, tag: str | None, state: dict | None, path: str | None, random_init: bool,
          tap: str, image_size: int | None, model_args: dict) -> TeacherParts:
    import sys

    import timm

    recorded = weights_preprocessing(path)
    kw = {**recorded["model_args"], **model_args, "num_classes": 0}  # given arguments win over recorded ones
    if image_size:
        kw["img_size"] = image_size
    if not random_init and state is None:
        hub_offline()
    def create(kw: dict):
        with quiet_hub():
            return timm.create_model(name, pretrained=not random_init and state is None, **kw)

    try:
        try:
            model = create(kw)
        except TypeError as e:  # CNNs take any input size: they have no img_size argument
            if "img_size" not in str(e):
                raise
            model = create({k: v for k, v in kw.items() if k != "img_size"})
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise TeacherError(f"timm has no model {name!r}") from e
        raise _missing_weights(spec, "pretrained weights", e) from e
    except Exception as e:
        raise _missing_weights(spec, "pretrained weights", e) from e
    if state is not None:  # as timm's load_pretrained: the model's own checkpoint filter, then drop the head
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        state = filter_fn(dict(state), model) if filter_fn else dict(state)
        heads = model.pretrained_cfg.get("classifier") or ()
        for head in ((heads,) if isinstance(heads, str) else heads) if not model.num_classes else ():
            state.pop(f"{head}.weight", None), state.pop(f"{head}.bias", None)
        load_into(model, state, path)
    cfg = model.pretrained_cfg  # the normalization a pretrained timm model expects, unless the weights say theirs
    mean, std = recorded.get("mean", tuple(cfg["mean"])), recorded.get("std", tuple(cfg["std"]))
    if not hasattr(model, "patch_embed"):  # a CNN: the last stage's feature map, one token per cell
        if tap != "final":
            raise TeacherError(f"tap {tap!r}: a convolutional teacher ({name}) has only `final` (its last feature map)")
        size = int(image_size or cfg["input_size"][-1])
        with torch.no_grad():
            probe = model.eval().forward_features(torch.zeros(1, 3, size, size))
        if probe.ndim != 4:  # e.g. MLP-Mixer: tokens without a patch_embed we know how to read
            raise TeacherError(f"timm model {name!r}: neither a ViT (patch_embed) nor a CNN (a [B, C, H, W] feature "
                               f"map; it gives {tuple(probe.shape)}): not supported as a teacher")

        def features(x):
            return model.forward_features(x).flatten(2).transpose(1, 2)
        return TeacherParts(model, features, tuple(mean), tuple(std), size, tuple(probe.shape[-2:]),
                            int(probe.shape[1]))
    if tap == "final":
        def features(x):
            return model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[0]
    elif tap == "ln_post":
        def features(x):
            return model.forward_features(x)[:, model.num_prefix_tokens:]
    else:
        raise TeacherError(f"tap {tap!r} is not available for timm teachers (use final or ln_post)")
    return TeacherParts(model, features, tuple(mean), tuple(std), int(model.patch_embed.img_size[0]),
                        tuple(model.patch_embed.grid_size), int(model.embed_dim))


# family -> builder(spec, arch, tag, state, path, random_init, tap, image_size, model_args) -> TeacherParts
FAMILIES = {"open_clip": _open_clip, "timm": _timm}


def load_teacher(spec: str, *, weights: str | None = None, random_init: bool = False, tap: str = "final",
                 image_size: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
                 model_args: dict | None = None) -> Teacher:
    """Build a frozen teacher. A weights file (a local path) is read with `weights.read_state_dict`, never
    handed to a library loader, so nothing is unpickled. Random init is seeded (so `verify` can rebuild it)
    and loudly recorded."""
    if tap not in TAPS:
        raise TeacherError(f"unknown tap {tap!r}; choose one of {', '.join(TAPS)}")
    if weights and random_init:
        raise TeacherError("--teacher-weights and --random-init exclude each other")
    family, arch, tag = parse_spec(spec)
    state = read_state_dict(weights) if weights else None
    if random_init:
        torch.manual_seed(seed)
    if not image_size:  # the size the weights trained at (mdtrain records it), else 224 as ever: a model's own
        image_size = weights_preprocessing(weights).get("image_size") or DEFAULT_IMAGE_SIZE  # (518 px) costs 5x
    parts = FAMILIES[family](spec, arch, tag, state, weights, random_init, tap, image_size, dict(model_args or {}))
    parts.model.eval().requires_grad_(False).to(device)
    source = ("random-init" if random_init else
              "file:" + os.path.basename(weights) if weights else f"pretrained:{tag or 'timm'}")
    identity = {"family": family, "arch": os.path.basename(arch).removesuffix(".json"), "weights": source,
                "weights_sha256": weights_digest(parts.model), "tap": tap, "image_size": parts.image_size,
                "mean": list(parts.mean), "std": list(parts.std)}
    if random_init:
        identity["init_seed"] = seed
    if model_args:  # only when given, so the ids of existing caches do not change
        identity["model_args"] = dict(sorted(model_args.items()))
    return Teacher(**{f.name: getattr(parts, f.name) for f in fields(parts)}, spec=spec, identity=identity)


def load_cache_teacher(cache, spec: str | None = None, weights: str | None = None, device: str | torch.device = "cpu",
                       random_init: bool | None = None) -> Teacher:
    """Rebuild the teacher that made `cache` (a `store.Cache`), and refuse any other: the weights digest
    must equal the one in the cache's fingerprint. `spec` defaults to the cache's own teacher spec."""
    ident = cache.teacher_identity
    from_file = ident["weights"].startswith("file:")
    if from_file and not weights:
        raise TeacherError(f"cache {cache.url} was made with teacher weights from a file "
                           f"({ident['weights'][5:]}); pass it with --teacher-weights PATH")
    if random_init is None:
        random_init = ident["weights"] == "random-init"
    teacher = load_teacher(spec or cache.teacher_spec, weights=weights, random_init=random_init,
                           tap=ident["tap"], image_size=ident["image_size"], device=device,
                           seed=int(ident.get("init_seed", 0)), model_args=ident.get("model_args"))
    if teacher.identity["weights_sha256"] != ident["weights_sha256"]:
        raise TeacherError(f"cache {cache.url} was made by another teacher: weights digest "
                           f"{ident['weights_sha256'][:12]} in the manifest, {teacher.identity['weights_sha256'][:12]} "
                           f"loaded ({spec or cache.teacher_spec})")
    return teacher


def run_teacher(teacher: Teacher, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Images -> float32 patch features [B, P, D]. uint8 images are moved as they are (4x fewer bytes than
    float) and normalized with the teacher's mean/std on its device; float images are taken as normalized.
    no_grad, not inference_mode: online, the trainer's loss may save the targets for backward (mse or smooth_l1
    without a target norm), which an inference tensor cannot be."""
    device = next(teacher.model.parameters()).device
    with torch.no_grad():
        x = x.to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalize(x, teacher.mean, teacher.std)
        with autocast(device, precision):
            out = teacher.features(x)
        return out.float()
