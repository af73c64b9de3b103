"""`mdtrain eval` (top-1/top-5 of a classifier) and `mdtrain knn` (k-NN on frozen features).

k-NN follows DINO's `knn_classifier`: L2-normalized features, cosine similarity, the k nearest
training images vote for their label with weight exp(similarity / T). It needs no training, so
it is the quick quality signal for a pretrained student (k=20, T=0.07 as in DINO).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from mdcache.config import opt
from mdcache.store import fetch

from . import labelled
from .finetune import (Dist, InitError, _storage_options, autocast, build_model, data_config, default_split,
                       eval_transform, evaluate_batches, init_distributed, layer_scale_of, load_backbone, read_state_dict,
                       resolve_amp, resolve_device, weights_metadata)


@dataclass
class EvalConfig:
    """Top-1/top-5 accuracy of a classifier (e.g. runs/ft/best.safetensors) on a labelled set."""

    weights: str = opt("", "Classifier weights (path or fsspec URL): .safetensors from `mdtrain finetune` (model and size read from its metadata).")
    val: str = opt("", "Labelled data: tar shards with .cls, a class folder, or with --loader ffcv a .beton.")
    model: str = opt("", "timm model name; empty = from the weights' metadata.")
    num_classes: int = opt(0, "Classes; 0 = from the classifier's shape in the weights.")
    input_size: int = opt(0, "Image side; 0 = from the weights' metadata, else 224.")
    global_pool: str = opt("", "timm global_pool; empty = from the weights' metadata / the model default.")
    crop_pct: float = opt(0.0, "Center-crop fraction; 0 = from the weights' metadata, else 0.875.")
    batch_size: int = opt(64, "Batch size per process.")
    num_workers: int = opt(2, "Data loading workers.")
    loader: str = opt("default", "default or ffcv.")
    amp: str = opt("auto", "Autocast: auto (bf16 on GPUs that support it, fp32 elsewhere), bf16, fp32.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE (repeatable).")


@dataclass
class KnnConfig:
    """k-NN classification (k=20, cosine, temperature-weighted votes as in DINO) on frozen features."""

    weights: str = opt("", "Backbone weights, path or fsspec URL (student.safetensors, or any finetune .safetensors: the classifier is ignored).")
    train: str = opt("", "Labelled reference set (the k-NN memory): tar shards with .cls or a class folder.")
    val: str = opt("", "Labelled query set.")
    model: str = opt("", "timm model name; empty = from the weights' metadata.")
    input_size: int = opt(0, "Image side; 0 = from the weights' metadata, else 224.")
    global_pool: str = opt("", "Feature pooling: '' = model default (CLS token for ViTs), 'avg'.")
    crop_pct: float = opt(0.875, "Center-crop fraction for both sets.")
    k: int = opt(20, "Neighbours that vote.")
    temperature: float = opt(0.07, "Vote weight exp(cosine / T).")
    batch_size: int = opt(64, "Batch size for feature extraction.")
    num_workers: int = opt(2, "Data loading workers.")
    amp: str = opt("auto", "Autocast: auto (bf16 on GPUs that support it, fp32 elsewhere), bf16, fp32.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE (repeatable).")


def _resolve(weights: str, model: str, input_size: int, global_pool: str) -> tuple[str, int, str, dict]:
    meta = weights_metadata(weights)
    model = model or meta.get("model", "")
    if not model:
        raise ValueError(f"--model is required: {weights} does not record its model name")
    return model, input_size or int(meta.get("input_size", 224)), global_pool or meta.get("global_pool", ""), meta


def _mean_std(model_name: str, meta: dict) -> tuple[tuple, tuple]:
    """The normalization the weights were trained with (finetune records it), else ImageNet's."""
    if "mean" in meta and "std" in meta:
        return tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
    return data_config(model_name)


def load_classifier(cfg: EvalConfig) -> tuple[torch.nn.Module, dict]:
    """The model as saved by finetune: classifier size from the weights, every tensor must load."""
    model_name, size, pool, meta = _resolve(cfg.weights, cfg.model, cfg.input_size, cfg.global_pool)
    sd = read_state_dict(cfg.weights)
    head = next((v for k, v in sd.items() if k in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight")), None)
    num_classes = cfg.num_classes or (int(head.shape[0]) if head is not None else int(meta.get("num_classes", 0)))
    if not num_classes:
        raise InitError(f"{cfg.weights}: no classifier found; `mdtrain eval` needs finetuned weights "
                        f"(use `mdtrain knn` for a backbone)")
    model = build_model(model_name, num_classes, size, global_pool=pool, layer_scale=layer_scale_of(cfg.weights))
    report = load_backbone(model, cfg.weights)
    if report["missing"]:
        raise InitError(f"{cfg.weights}: classifier tensors missing ({', '.join(report['missing'])}); "
                        f"eval needs the finetuned head")
    crop = cfg.crop_pct or float(meta.get("crop_pct", 0.875))
    mean, std = _mean_std(model_name, meta)
    return model, {"model": model_name, "input_size": size, "num_classes": num_classes, "crop_pct": crop,
                   "mean": mean, "std": std}


def _val_batches(spec: str, loader: str, mean: tuple, std: tuple, size: int, crop: float, batch_size: int,
                 num_workers: int, num_classes: int, dist: Dist, device: torch.device, so: dict) -> Iterator:
    if loader == "ffcv":
        from . import ffcv_loader

        return ffcv_loader.val_split(spec, batch_size, size, crop, mean, std, num_workers, dist.rank, dist.world,
                                     device, num_classes).batches(0)
    if loader != "default":
        raise ValueError(f"--loader {loader!r}: expected default or ffcv")
    return default_split(spec, eval_transform(size, crop, mean, std), batch_size, num_workers, False, 0, num_classes,
                         -1, 0, so).batches(0)


def evaluate(cfg: EvalConfig) -> dict:
    """Top-1/top-5 (%) and mean loss of --weights on --val (all ranks under torchrun)."""
    if not cfg.weights or not cfg.val:
        raise ValueError("--weights and --val are both required")
    dist = init_distributed()
    device = resolve_device(cfg.device)
    model, info = load_classifier(cfg)
    model.to(device)
    batches = _val_batches(cfg.val, cfg.loader, info["mean"], info["std"], info["input_size"], info["crop_pct"],
                           cfg.batch_size, cfg.num_workers, info["num_classes"], dist, device,
                           _storage_options(cfg.storage_option))
    r = evaluate_batches(model, batches, device, resolve_amp(cfg.amp, device), dist)
    return {**r, **info, "weights": cfg.weights, "val": cfg.val}


# ----------------------------------------------------------------------------- k-NN

@torch.no_grad()
def extract_features(model: torch.nn.Module, batches: Iterator, device: torch.device,
                     amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logits features (float32, not normalized) and labels of every batch."""
    model.eval()
    feats, labels = [], []
    for x, y in batches:
        with autocast(device, amp):
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


def knn(cfg: KnnConfig) -> dict:
    """Frozen-feature k-NN of --weights: features of --train are the memory, --val the queries."""
    if not cfg.weights or not cfg.train or not cfg.val:
        raise ValueError("--weights, --train and --val are all required")
    model_name, size, pool, meta = _resolve(cfg.weights, cfg.model, cfg.input_size, cfg.global_pool)
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    model = build_model(model_name, 0, size, global_pool=pool, layer_scale=layer_scale_of(cfg.weights))
    report = load_backbone(model, cfg.weights)
    model.to(device)
    so = _storage_options(cfg.storage_option)
    mean, std = _mean_std(model_name, meta)
    t = eval_transform(size, cfg.crop_pct, mean, std)
    info = labelled.scan_source(cfg.train, so)
    feats = {}
    for name, spec in (("train", cfg.train), ("val", cfg.val)):
        split = default_split(spec, t, cfg.batch_size, cfg.num_workers, False, 0, info.num_classes, -1, 0, so)
        feats[name] = extract_features(model, split.batches(0), device, amp)
    r = knn_classify(*feats["train"], *feats["val"], k=cfg.k, temperature=cfg.temperature, num_classes=info.num_classes)
    return {**r, "model": model_name, "input_size": size, "train_n": len(feats["train"][0]),
            "weights": cfg.weights, "ignored": report["notes"]}


def _cli(fn, cfg) -> None:
    from .finetune import run_command

    def with_local_weights(cfg):  # --weights may be any fsspec URL
        return fn(dataclasses.replace(cfg, weights=fetch(cfg.weights, _storage_options(cfg.storage_option)))
                  if cfg.weights else cfg)

    r = run_command(with_local_weights, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(r))


def run_eval_cli(cfg: EvalConfig) -> None:
    _cli(evaluate, cfg)


def run_knn_cli(cfg: KnnConfig) -> None:
    _cli(knn, cfg)
