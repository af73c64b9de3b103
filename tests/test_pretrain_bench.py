"""`mdtrain bench` runs every phase on a real cache and reports consistent numbers (not a timing test)."""
import json

from pretrain_helpers import STUDENT, TINY_TEACHER, mdtrain, shared_cache


def test_bench_reports_all_phases(tmp_path_factory, train_spec):
    url = shared_cache(tmp_path_factory, train_spec)
    p = mdtrain("bench", "--cache", url, "--student", STUDENT, "--teacher", TINY_TEACHER, "--random-init",
                "--batches", "3", "--warmup", "1", "--loader-batches", "5", "--json")
    r = json.loads(p.stdout[p.stdout.index("{"):])
    for key in ("loader_targets_ips", "loader_images_ips", "student_only_ips", "cached_step_ips", "online_step_ips",
                "cached_peak_rss_mb", "online_peak_rss_mb", "teacher_mb"):
        assert r[key] > 0, key
    assert r["ratio_cached_vs_online"] == r["cached_step_ips"] / r["online_step_ips"]
    assert r["rss_saving_mb"] == r["online_peak_rss_mb"] - r["cached_peak_rss_mb"]
    human = mdtrain("bench", "--cache", url, "--student", STUDENT, "--batches", "2", "--warmup", "1", "--loader-batches", "4", "--repeats", "1")
    assert "cached step / student-only" in human.stdout and "online phase skipped" in human.stdout
