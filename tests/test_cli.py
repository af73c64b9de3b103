"""One vocabulary across both CLIs, and the old spellings still accepted for a release, with a warning."""
from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import TINY_TEACHER, TRAIN_FLAGS, invoke, shared_cache

from mdcache.commands import CONFIGS, flag_name


def flags_of(cfg_cls) -> dict[str, dataclasses.Field]:
    return {flag_name(f): f for f in dataclasses.fields(cfg_cls)}


def test_one_vocabulary():
    """--teacher-weights is the teacher's weights everywhere (--weights only a model's own, in eval/knn/linprobe),
    --cache one cache and --root a cache root, --json prints JSON, and no flag reads --no-no-..."""
    import typer

    import mdcache.cli  # noqa: F401 (registers the commands)
    import mdtrain.cli  # noqa: F401

    for name, cfg_cls in CONFIGS.items():
        flags = flags_of(cfg_cls)
        for flag, f in flags.items():
            text = f.metadata.get("help", "").lower()
            if flag == "--weights":
                assert name in ("mdtrain eval", "mdtrain knn", "mdtrain linprobe"), name
            if flag == "--cache":
                assert "root" not in text.split("(")[0], (name, text)  # one cache, never a root
            if flag == "--root":
                assert "root" in text, (name, text)
            if "json" in f.name:
                assert flag in ("--json", "--json-out") and (f.type in (bool, "bool") or f.metadata.get("hidden"))
    for app in (mdcache.cli.app, mdtrain.cli.app):
        for cmd in typer.main.get_command(app).commands.values():
            assert not any("--no-no-" in o for p in cmd.params for o in p.secondary_opts), cmd.name


def test_old_spellings_work_for_a_release_with_a_warning(tmp_path, train_spec):
    args = ["extract", "--source", train_spec, "--teacher", TINY_TEACHER, "--random-init", "--image-size", "64",
            "--views", "1", "--codec", "fp16", "--workers", "0", "--shards", "0:1"]
    new = invoke(*args, "--root", tmp_path / "new")
    old = invoke(*args, "--cache", tmp_path / "old")
    assert new.exit_code == old.exit_code == 0
    assert "--cache is now --root" in old.stderr and "is now" not in new.stderr
    assert new.stdout.strip().rsplit("/", 1)[-1] == old.stdout.strip().rsplit("/", 1)[-1]
    assert (tmp_path / "old").is_dir()


def test_log_every_0_means_the_same_in_pretrain_and_finetune(tmp_path_factory, train_spec, tmp_path):
    """0: no periodic logging (finetune: no progress lines; pretrain: only the last step's row)."""
    url = shared_cache(tmp_path_factory, train_spec)
    flags = [f for f in TRAIN_FLAGS if f not in ("--log-every", "1")]
    r = invoke("pretrain", "--cache", url, *flags, "--workers", "0", "--epochs", "1", "--stop-after", "5",
               "--log-every", "0", "--out", tmp_path / "pt", module="mdtrain")
    assert r.exit_code == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [5]


@pytest.mark.parametrize("module,command", [("mdtrain", "pretrain"), ("mdcache", "extract")])
def test_help_is_grouped_and_whole(module, command):
    r = invoke(command, "--help", module=module)
    assert r.exit_code == 0 and "Views" in r.stdout
    if command == "pretrain":
        assert all(g in r.stdout for g in ("Data", "Student", "Optimization", "Objective", "Online teacher", "Run"))
