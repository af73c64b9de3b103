"""`mdtrain eval` (top-1/top-5 of a classifier), `mdtrain knn` and `mdtrain linprobe` (frozen features).

k-NN follows DINO's `knn_classifier`: L2-normalized features, cosine similarity, the k nearest
training images vote for their label with weight exp(similarity / T). It needs no training, so
it is the quick quality signal for a pretrained student (k=20, T=0.07 as in DINO).

The linear probe follows MAE's: the backbone is frozen, a BatchNorm without affine parameters
normalizes its pooled features, and one linear layer is trained on top (SGD, cosine schedule with
warmup, head initialized with std 0.01). Unlike MAE, the features are computed once (center crops,
no augmentation) and the head trains on them: seconds instead of a pass through the backbone per step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from mdcache.commands import model_args_opt, opt, precision_opt, storage_options_opt
from mdcache.devices import autocast, resolve_precision, use_device
from mdcache.errors import ConfigError
from mdcache.fs import fetch

from . import labelled
from .checkpoint import read_state_dict
from .classifier import InitError, build_model, describe_weights, evaluate_batches, layer_scale_of, load_backbone
from .runtime import init_distributed

MODEL = "model (unset: from the weights)"
RUN = "run"


@dataclass
class FrozenModelConfig:
    """What eval, knn and linprobe share: the weights, how they become a model (each unset option is read
    from the weights' metadata, as `mdtrain finetune` and `pretrain` record it), and how the run goes."""

    weights: str = opt("", "Model weights, path or fsspec URL (.safetensors).", required=True)
    model: Optional[str] = opt(None, "timm model name; None = from the weights' metadata.", group=MODEL)
    model_args: dict = model_args_opt("--model-arg", "model (None = from the weights\' metadata)", group=MODEL)
    image_size: Optional[int] = opt(None, "Image side; None = from the weights' metadata, else 224.", ge=1,
                                    group=MODEL)
    global_pool: Optional[str] = opt(None, "Pooling (timm global_pool): None = from the weights' metadata (avg for "
                                           "a pretrained student, whose CLS token is never trained), else the model "
                                           "default; avg, token.", group=MODEL)
    crop_pct: Optional[float] = opt(None, "Center-crop fraction of every labelled set; None = from the weights' "
                                          "metadata, else 0.875.", gt=0, le=1, group=MODEL)
    batch_size: int = opt(64, "Images per forward pass, per process.", ge=1, group=RUN)
    workers: int = opt(2, "Data loading workers.", ge=0, group=RUN)
    precision: str = precision_opt(group=RUN)
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.", group=RUN)
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).", group=RUN)


@dataclass
class EvalConfig(FrozenModelConfig):
    """Top-1/top-5 accuracy of a classifier (e.g. runs/ft/best.safetensors) on a labelled set."""

    weights: str = opt("", "Classifier weights (path or fsspec URL): .safetensors from `mdtrain finetune` (model and "
                           "size read from its metadata).", required=True)
    val: str = opt("", "Labelled data: tar shards with .cls, a class folder, or with --loader ffcv a .beton.",
                   required=True)
    num_classes: Optional[int] = opt(None, "Classes; None = from the classifier's shape in the weights.", ge=1)
    loader: str = opt("default", "default or ffcv.")


@dataclass
class FrozenFeaturesConfig(FrozenModelConfig):
    """knn and linprobe: a backbone's pooled features on a labelled training set and an evaluation set."""

    weights: str = opt("", "Backbone weights, path or fsspec URL (student.safetensors, or any .safetensors in timm "
                           "naming, e.g. from finetune: a classifier in it is ignored).", required=True)
    train: str = opt("", "Labelled training set (the k-NN memory, the probe's training data): tar shards with .cls "
                         "or a class folder.", required=True)
    val: str = opt("", "Labelled evaluation set.", required=True)


@dataclass
class KnnConfig(FrozenFeaturesConfig):
    """k-NN classification (k=20, cosine, temperature-weighted votes as in DINO) on frozen features."""

    k: int = opt(20, "Neighbours that vote.", ge=1)
    temperature: float = opt(0.07, "Vote weight exp(cosine / T).", gt=0)


def _mean_std(model_name: str, meta: dict) -> tuple[tuple, tuple]:
    """The normalization the weights were trained with (finetune records it), else ImageNet's."""
    if "mean" in meta and "std" in meta:
        return tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
    return labelled.data_config(model_name)


def load_classifier(cfg: EvalConfig) -> tuple[torch.nn.Module, dict]:
    """The model as saved by finetune: classifier size from the weights, every tensor must load."""
    w = describe_weights(cfg.weights, cfg.model, cfg.image_size, cfg.global_pool, cfg.model_args)
    meta = w["meta"]
    sd = read_state_dict(cfg.weights)
    head = next((v for k, v in sd.items() if k in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight")),
                None)
    num_classes = cfg.num_classes or (int(head.shape[0]) if head is not None else int(meta.get("num_classes", 0)))
    if not num_classes:
        raise InitError(f"{cfg.weights}: no classifier found; `mdtrain eval` needs finetuned weights "
                        f"(use `mdtrain knn` for a backbone)")
    model = build_model(w["model"], num_classes, w["image_size"], global_pool=w["global_pool"],
                        model_args=w["model_args"],
                        layer_scale=layer_scale_of(cfg.weights))
    report = load_backbone(model, cfg.weights)
    if report["missing"]:
        raise InitError(f"{cfg.weights}: classifier tensors missing ({', '.join(report['missing'])}); "
                        f"eval needs the finetuned head")
    mean, std = _mean_std(w["model"], meta)
    return model, {"model": w["model"], "image_size": w["image_size"], "num_classes": num_classes,
                   "crop_pct": cfg.crop_pct or float(meta.get("crop_pct", 0.875)), "mean": mean, "std": std}


def evaluate(cfg: EvalConfig) -> dict:
    """Top-1/top-5 (%) and mean loss of --weights on --val (all ranks under torchrun)."""
    if not cfg.weights or not cfg.val:
        raise ConfigError("--weights and --val are both required")
    device = use_device(cfg.device)
    dist = init_distributed(device)
    model, info = load_classifier(cfg)
    model.to(device)
    split = labelled.val_split(cfg.val, cfg.loader, info["image_size"], info["crop_pct"], info["mean"], info["std"],
                               cfg.batch_size, cfg.workers, info["num_classes"], device, cfg.storage_options)
    r = evaluate_batches(model, split.batches(0), device, resolve_precision(cfg.precision, device), dist)
    return {**r, **info, "weights": cfg.weights, "val": cfg.val}


# ----------------------------------------------------------------------------- k-NN

@torch.no_grad()
def extract_features(model: torch.nn.Module, batches: Iterator, device: torch.device,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logits features (float32, not normalized) and labels of every batch."""
    model.eval()
    feats, labels = [], []
    for x, y in batches:
        with autocast(device, precision):
            f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(y.long().cpu())
    if not feats:
        raise RuntimeError("feature extraction saw no images")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None, chunk: int = 256) -> dict:
    """DINO's weighted k-NN: top-1/top-5 (%) of val given the train memory (features L2-normalized here)."""
    train_f, val_f = F.normalize(train_f.float(), dim=1), F.normalize(val_f.float(), dim=1)
    c = num_classes or int(max(train_y.max(), val_y.max())) + 1
    k = min(k, len(train_f))
    top1 = top5 = 0
    for i in range(0, len(val_f), chunk):
        q, y = val_f[i:i + chunk], val_y[i:i + chunk]
        sim, idx = (q @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(q), c).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        pred = votes.argsort(dim=1, descending=True)
        top1 += pred[:, :1].eq(y.view(-1, 1)).sum().item()
        top5 += pred[:, :min(5, c)].eq(y.view(-1, 1)).sum().item()
    n = len(val_f)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "n": n, "k": k, "temperature": temperature}


def frozen_features(cfg: "KnnConfig | LinprobeConfig") -> tuple[dict, dict, dict, int]:
    """(weights description, load report, {"train"/"val": (features, labels)}, classes) of a frozen backbone.
    Model and image size come from the weights' metadata (a pretrained student records both)."""
    if not cfg.weights or not cfg.train or not cfg.val:
        raise ConfigError("--weights, --train and --val are all required")
    w = describe_weights(cfg.weights, cfg.model, cfg.image_size, cfg.global_pool, cfg.model_args)
    if w["global_pool"] is None and w["meta"].get("kind") == "pretrain-student":
        w["global_pool"] = "avg"  # MaskDistill trains patch tokens, never the CLS token: pool the patches
    device = use_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model = build_model(w["model"], 0, w["image_size"], global_pool=w["global_pool"],
                        layer_scale=layer_scale_of(cfg.weights), model_args=w["model_args"])
    report = load_backbone(model, cfg.weights)
    model.to(device)
    so = cfg.storage_options
    mean, std = _mean_std(w["model"], w["meta"])
    t = labelled.eval_transform(w["image_size"], cfg.crop_pct or float(w["meta"].get("crop_pct", 0.875)), mean, std)
    info = labelled.scan_source(cfg.train, so)
    feats = {}
    for name, spec in (("train", cfg.train), ("val", cfg.val)):
        split = labelled.default_split(spec, t, cfg.batch_size, cfg.workers, False, 0, info.num_classes, -1, 0, so)
        feats[name] = extract_features(model, split.batches(0), device, precision)
    return w, report, feats, info.num_classes


def knn(cfg: KnnConfig) -> dict:
    """Frozen-feature k-NN of --weights: features of --train are the memory, --val the queries."""
    w, report, feats, classes = frozen_features(cfg)
    r = knn_classify(*feats["train"], *feats["val"], k=cfg.k, temperature=cfg.temperature, num_classes=classes)
    return {**r, "model": w["model"], "image_size": w["image_size"], "train_n": len(feats["train"][0]),
            "weights": cfg.weights, "ignored": report["notes"]}


# ----------------------------------------------------------------------------- linear probe

@dataclass
class LinprobeConfig(FrozenFeaturesConfig):
    """Linear probe on frozen features (MAE protocol: BatchNorm without affine + one linear layer)."""

    epochs: int = opt(100, "Epochs over the (precomputed) training features.", ge=1)
    warmup_epochs: int = opt(10, "Linear warmup epochs.", ge=0)
    probe_batch_size: int = opt(256, "Batch size of the probe's SGD steps.", ge=1)
    lr: float = opt(0.1, "Peak SGD learning rate (momentum 0.9, cosine to 0).", gt=0)
    weight_decay: float = opt(0.0, "Weight decay of the linear layer (MAE: 0).", ge=0)
    seed: int = opt(0, "Seed of the probe's init and batch order.", ge=0)


def train_probe(train_f: torch.Tensor, train_y: torch.Tensor, classes: int, epochs: int, warmup_epochs: int,
                batch_size: int, lr: float, weight_decay: float, seed: int) -> torch.nn.Module:
    """BatchNorm1d(affine=False) + Linear trained with SGD on fixed features (CPU, float32)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_f.shape[1], classes)
    torch.nn.init.trunc_normal_(head.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(head.bias)
    probe = torch.nn.Sequential(torch.nn.BatchNorm1d(train_f.shape[1], affine=False, eps=1e-6), head)
    opt_ = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train_f) // batch_size)
    total, warm = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    step = 0
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_f), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            for group in opt_.param_groups:
                group["lr"] = lr * (step + 1) / warm if step < warm else \
                    lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            loss = F.cross_entropy(probe(train_f[idx]), train_y[idx])
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
            step += 1
    return probe.eval()


def linprobe(cfg: LinprobeConfig) -> dict:
    """Train a linear probe on --train's frozen features; top-1/top-5 (%) on --val."""
    w, report, feats, classes = frozen_features(cfg)
    (train_f, train_y), (val_f, val_y) = feats["train"], feats["val"]
    probe = train_probe(train_f, train_y, classes, cfg.epochs, cfg.warmup_epochs, cfg.probe_batch_size, cfg.lr,
                        cfg.weight_decay, cfg.seed)
    with torch.no_grad():
        top = probe(val_f).topk(min(5, classes), dim=1).indices
        train_acc = 100 * probe(train_f).argmax(1).eq(train_y).float().mean().item()
    hit = top.eq(val_y.view(-1, 1))
    return {"top1": 100 * hit[:, :1].float().sum().item() / len(val_y), "top5": 100 * hit.float().sum().item()
            / len(val_y), "train_top1": train_acc, "n": len(val_y), "train_n": len(train_y), "model": w["model"],
            "image_size": w["image_size"], "weights": cfg.weights, "ignored": report["notes"]}


def _local_weights(cfg):
    """--weights may be any fsspec URL: the functions below read a local copy."""
    return dataclasses.replace(cfg, weights=fetch(cfg.weights, cfg.storage_options)) if cfg.weights else cfg


def run_eval_cli(cfg: EvalConfig) -> None:
    r = evaluate(_local_weights(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(r), flush=True)


def run_knn_cli(cfg: KnnConfig) -> None:
    print(json.dumps(knn(_local_weights(cfg))), flush=True)


def run_linprobe_cli(cfg: LinprobeConfig) -> None:
    print(json.dumps(linprobe(_local_weights(cfg))), flush=True)
