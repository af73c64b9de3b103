"""`mdcache show`: a picture of what a cache holds, for a person to look at.

For a few samples of one committed shard: the stored view replayed on the source image (what the
teacher saw), a student's masked input (a random 75/196 patch mask, as an illustration), and the
stored targets as colours (the first three principal components of the per-token LayerNorm'ed
features, shared by all samples, so the same colour means a similar feature). With the teacher at
hand (its weights, or a random-init cache) the last panel is the histogram of per-token cosine
between the stored targets and the teacher re-run in fp32 on the replayed views.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from rich.console import Console

from . import codecs, sources, store, views
from . import fs as mfs
from .commands import opt, storage_options_opt
from .errors import CacheError, ConfigError, TeacherError
from .lazy import lazy

torch = lazy("torch")

console = Console(stderr=True)


@dataclass
class ShowConfig:
    """Draw a few samples of a cache: replayed view, masked input, targets as colours, fidelity histogram."""

    cache: str = opt(None, "Cache directory (<root>/<cache-id>), local path or fsspec URL.")
    out: str = opt("views.png", "PNG file to write.")
    n: int = opt(6, "Samples to draw (from the first committed shard, or --shard).", ge=1)
    view: int = opt(0, "Which stored view of each sample.", ge=0)
    shard: Optional[str] = opt(None, "Shard to draw from (default: the first committed one).")
    teacher_weights: Optional[str] = opt(None, "Teacher weights, for the fidelity histogram (a random-init cache needs "
                                               "none).", old=("--weights",))
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).")


def targets_to_rgb(targets: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[N, P, D] features -> [N, H, W, 3] colours in [0, 1]: PCA to 3 components over all tokens."""
    x = codecs.token_layernorm(targets).reshape(-1, targets.shape[-1])
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    y = x @ v[:3].T
    y = (y - y.amin(0)) / (y.amax(0) - y.amin(0)).clamp_min(1e-12)
    return y.reshape(targets.shape[0], grid[0], grid[1], 3).numpy()


def output_path(out: str) -> str:
    """Where the picture goes: into a folder as views.png, a name without a suffix gets .png (what matplotlib
    would write anyway, so the message names the real file), and the folder must exist."""
    if os.path.isdir(out):
        out = os.path.join(out, "views.png")
    elif not os.path.splitext(out)[1]:
        out += ".png"
    folder = os.path.dirname(out) or "."
    if not os.path.isdir(folder):
        raise ConfigError(f"--out {out}: the folder {folder} does not exist")
    return out


def show(cfg: ShowConfig) -> str:
    so = cfg.storage_options
    out = output_path(cfg.out)
    cache = store.open_cache(cfg.cache, so)
    if not cache.shard_names:
        raise CacheError(f"{cache.url}: no committed shard to show yet")
    shard = cfg.shard or cache.shard_names[0]
    keys, targets, params = cache.read(shard, cfg.view)
    n = min(cfg.n, len(keys))
    by_name = {s.name: s for s in cache.sources()}
    wanted, images = set(keys[:n]), {}
    for sample in sources.iter_samples(by_name[shard], so):
        if sample.key in wanted:
            images[sample.key] = views.decode_image(sample.data)
        if len(images) == n:
            break
    if len(images) < n:
        gone = sorted(wanted - set(images))
        raise CacheError(f"{cache.url}: shard {shard}: source {by_name[shard].url} no longer has key(s) "
                         f"{', '.join(gone[:3])} (the source changed since extraction)")
    replayed = [views.replay(images[k], params[i], cache.image_size, cache.replay) for i, k in enumerate(keys[:n])]
    stored = torch.from_numpy(targets[:n])
    colours = targets_to_rgb(stored, cache.patch_grid)
    cosines = fidelity(cache, replayed, stored, cfg)
    try:
        draw(out, cache, shard, keys[:n], replayed, colours, cosines)
    except (OSError, ValueError) as e:  # unwritable, or a suffix matplotlib cannot write
        raise ConfigError(f"--out {out}: cannot write the picture ({e})") from None
    return out


def fidelity(cache: store.Cache, replayed: list, stored: torch.Tensor, cfg: ShowConfig) -> np.ndarray | None:
    from .teachers import load_cache_teacher, run_teacher

    try:
        weights = mfs.fetch(cfg.teacher_weights, cfg.storage_options) if cfg.teacher_weights else None
        teacher = load_cache_teacher(cache, weights=weights)
    except TeacherError as e:
        console.print(f"[yellow]no fidelity histogram:[/] {e}")
        return None
    fresh = run_teacher(teacher, torch.stack([views.image_tensor(v) for v in replayed]))
    a, b = codecs.token_layernorm(fresh.cpu()), codecs.token_layernorm(stored)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).reshape(-1).numpy()


def draw(out: str, cache: store.Cache, shard: str, keys: list[str], replayed: list, colours: np.ndarray,
         cosines: np.ndarray | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    n, (gh, gw) = len(keys), cache.patch_grid
    rows = n + (1 if cosines is not None else 0)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for i, (key, view) in enumerate(zip(keys, replayed)):
        img = np.asarray(view, dtype=np.float32) / 255
        mask = np.zeros(gh * gw, bool)
        mask[rng.permutation(gh * gw)[:round(75 / 196 * gh * gw)]] = True
        cell = np.kron(mask.reshape(gh, gw), np.ones((img.shape[0] // gh, img.shape[1] // gw)))
        masked = img.copy()
        masked[cell.astype(bool)] = 0.5
        for j, (picture, title) in enumerate(((img, f"{key[-24:]}: view"), (masked, "masked input"),
                                             (colours[i], "targets (PCA to RGB)"))):
            ax = axes[i][j]
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    if cosines is not None:
        ax = plt.subplot2grid((rows, 3), (n, 0), colspan=3, fig=fig)
        for j in range(3):
            axes[n][j].remove()
        gap = np.clip(1 - cosines.astype(np.float64), 1e-9, None)  # 1 - cosine on a log axis: 0.99999 is readable
        ax.hist(gap, bins=np.logspace(np.log10(gap.min()), np.log10(gap.max()) + 1e-6, 40), color="tab:blue")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"1 - cosine per token: stored {cache.codec} vs the fp32 teacher, after LayerNorm\n"
                      f"(cosine mean {cosines.mean():.6f}, worst {cosines.min():.6f})", fontsize=8)
        ax.set_ylabel("tokens", fontsize=8)
    fig.suptitle(f"{cache.cache_id}  {shard}  {cache.teacher_spec}  K={cache.views}  {cache.codec}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_cli(cfg: ShowConfig) -> None:
    console.print(f"wrote {show(cfg)}")
