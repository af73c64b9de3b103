"""`mdtrain bench` runs every phase on a real cache (not a timing test): the cached process never loads
the teacher and peaks lower than the online one, and a phase that dies is an error, not a hang."""
import json
import os
import signal
import time

import pytest
from helpers import STUDENT, TINY_TEACHER, mdtrain, shared_cache

from mdtrain import bench


@pytest.mark.slow
def test_bench_reports_all_phases(tmp_path_factory, train_spec):
    url = shared_cache(tmp_path_factory, train_spec)
    p = mdtrain("bench", "--cache", url, "--student", STUDENT, "--teacher", TINY_TEACHER, "--random-init",
                "--batches", "3", "--warmup", "1", "--loader-batches", "5", "--json")
    r = json.loads(p.stdout[p.stdout.index("{"):])
    for key in ("loader_targets_ips", "loader_images_ips", "student_only_ips", "cached_step_ips", "online_step_ips",
                "online_memory_ips"):
        assert r[key] > 0, key
    assert r["ratio_cached_vs_online_compute"] == r["student_only_ips"] / r["online_memory_ips"]
    # The online phase really ran a teacher (its module imported, its weights counted); the cached one never did,
    # and running the same step without the teacher's library and weights takes less memory.
    assert r["online_imported_teacher"] and not r["cached_imported_teacher"]
    assert r["teacher_mb"] > 0
    assert r["cached_peak_rss_mb"] < r["online_peak_rss_mb"], r
    human = mdtrain("bench", "--cache", url, "--student", STUDENT, "--batches", "2", "--warmup", "1",
                    "--loader-batches", "4", "--repeats", "1")
    assert "cached step / student-only" in human.stdout and "online phase skipped" in human.stdout


def die(cfg, phase, queue):
    """A phase process killed from outside (the OOM killer, say) before it could report."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_phase_is_an_error_not_a_hang():
    t0 = time.time()
    with pytest.raises(RuntimeError, match=r"bench cached phase: its process exited with code -9"):
        bench._run_phase(bench.BenchConfig(cache="unused"), "cached", target=die)
    assert time.time() - t0 < 60


@pytest.mark.timeout(120)
def test_a_batch_no_worker_can_fill_is_an_error_not_a_hang(tmp_path_factory, train_spec):
    """Each worker lane makes its own full batches: with more lanes than the data fills, every epoch came out
    empty and the bench forked its workers again, forever (the GPU check's 15 workers on 1,024 images did)."""
    from dataclasses import replace

    import torch

    from mdcache.errors import ConfigError
    from mdtrain.data import DataError
    from mdtrain.pretrain import setup_data

    cfg = bench.BenchConfig(cache=shared_cache(tmp_path_factory, train_spec), student=STUDENT, batch_size=4096,
                            workers=2, device="cpu")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(DataError, match="no full batch of 4096"):
            bench._measure(cfg, "limits")
    finally:  # _measure sets this process's threads, as a bench phase's own process would
        torch.set_num_threads(threads)
    setup = setup_data(cfg.pretrain_config(online=False), torch.device("cpu"))
    setup = replace(setup, stream=replace(setup.stream, batch_size=4096))
    with pytest.raises(ConfigError, match="epoch 0 gave no batch of 4096"):
        next(bench.stream_batches(setup, 0, 3))
