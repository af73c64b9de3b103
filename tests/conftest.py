"""Shared fixtures: a real-photo WebDataset set and a tiny *real* open_clip ViT teacher (random init).

No weights can be downloaded here, so every teacher in the tests is randomly initialised on purpose
(`--random-init`), which the cache records in its fingerprint.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub from the tests

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """10 classes of real photo crops: train-{000000..000003}.tar (120 images), val-000000.tar (40)."""
    out = tmp_path_factory.mktemp("demo-data")
    subprocess.run([sys.executable, str(ROOT / "pipelines" / "demo" / "make_data.py"), "--out", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from 2 threads, and OpenMP spin-waits collapse when other processes
    share the 2 cores; restore the setting for other test modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def train_spec(demo_data) -> str:
    return str(demo_data / "train-{000000..000003}.tar")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the whole session."""
    import s3_server

    server = s3_server.start(tmp_path_factory.mktemp("s3"))
    yield server
    s3_server.stop(server)
