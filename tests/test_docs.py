"""The docs promise what the code does: the CLI reference is generated, the README's commands exist."""
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT


def test_cli_reference_is_current():
    fresh = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py")], capture_output=True,
                           text=True, check=True, cwd=ROOT).stdout
    assert (ROOT / "docs" / "cli.md").read_text() == fresh, \
        "docs/cli.md is stale: run `python scripts/gen_cli_docs.py > docs/cli.md`"


def test_readme_commands_exist_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    for script in re.findall(r"^bash (scripts/\S+\.sh)", readme, flags=re.M):
        assert (ROOT / script).exists(), script
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_doc_link_resolves():
    for md in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", md.read_text()):
            assert (md.parent / target).exists(), f"{md.name} links to missing {target}"


@pytest.mark.slow
def test_demo_pipeline_ends_with_the_closing_table(tmp_path):
    """The README's first command, at toy sizes, with the shipped teacher: every stage runs (eval, extract,
    verify, show, pretrain, linear probe, k-NN, finetune from the student and from scratch) and the closing
    table puts random-init, distilled and teacher side by side."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PY": sys.executable, "OUT": str(tmp_path / "demo"),
           "TRAIN_SIZE": "400", "VAL_SIZE": "200", "TEST_SIZE": "200", "PT_EPOCHS": "1", "FT_EPOCHS": "1"}
    p = subprocess.run(["bash", "pipelines/demo/run.sh"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = dict(re.findall(r"^(\S.*?\S)\s+(\d+\.\d\d)$", p.stdout.split("top-1 %")[-1], flags=re.M))
    assert set(table) == {"teacher as a classifier", "linear probe, random-init student",
                          "linear probe, distilled student", "linear probe, teacher", "k-NN, random-init student",
                          "k-NN, distilled student", "k-NN, teacher", "finetuned, distilled student (1 epochs)",
                          "finetuned, from scratch (1 epochs)"}, p.stdout[-2000:]
    assert all(0 <= float(v) <= 100 for v in table.values())
    assert float(table["teacher as a classifier"]) > 70  # the shipped teacher is trained (10 classes)
    assert float(table["k-NN, teacher"]) > 50
    for f in ("random-init/student.safetensors", "pretrain/student.safetensors", "finetune/best.safetensors",
              "scratch/best.safetensors"):
        assert (tmp_path / "demo" / f).exists(), f
    assert (tmp_path / "demo" / "views.png").stat().st_size > 10_000


def test_the_demo_names_a_missing_teacher(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "demo"), "TRAIN_SIZE": "16", "VAL_SIZE": "8",
           "TEST_SIZE": "8", "TEACHER": str(tmp_path / "nope.safetensors")}
    p = subprocess.run(["bash", "pipelines/demo/run.sh"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "no teacher weights at" in p.stderr and "nope.safetensors" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_the_plain_zarr_reader_in_the_format_doc_decodes_like_mdcache(tmp_path, train_spec):
    """docs/cache-format.md promises a cache is readable with zarr + numpy alone: run its snippet in a
    process where `import mdcache` fails, and compare with mdcache's own reader, for every codec."""
    import numpy as np
    from helpers import extract_cfg

    from mdcache import open_cache
    from mdcache.extract import extract

    doc = (ROOT / "docs" / "cache-format.md").read_text().split("## Reading a cache without mdcache")[1]
    readers = {"read_view": doc.split("```python")[1].split("```")[0],  # zarr
               "read_view_tensorstore": doc.split("```python")[2].split("```")[0]}
    for (codec, reader) in (("fp16", "read_view"), ("int8", "read_view"), ("int4", "read_view"),
                            ("pca:16", "read_view"), ("int8", "read_view_tensorstore")):
        cfg = extract_cfg(train_spec, str(tmp_path / codec.replace(":", "")), codec=codec, shards="0:1")
        url, _ = extract(cfg, progress=False)
        out = tmp_path / f"{codec.replace(':', '')}-{reader}.npz"
        code = ("import sys\nsys.modules['mdcache'] = None  # the snippet must not need the package\n"
                + readers[reader] + f"\nkeys, t, v = {reader}({url!r}, 'train-000000', 1)\n"
                f"import numpy\nnumpy.savez({str(out)!r}, t=t, v=v, keys=numpy.array(keys))\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        keys, targets, params = open_cache(url).read("train-000000", 1)
        got = np.load(out)
        assert list(got["keys"]) == keys and np.array_equal(got["v"], params)
        np.testing.assert_allclose(got["t"], targets, rtol=0, atol=1e-6 * max(1.0, float(np.abs(targets).max())))


def test_every_help_reads_at_80_columns():
    """--help at 80 columns: no line wider than the terminal, required options marked, defaults written as a
    person would (75/196, not 0.3826530612244898)."""
    import typer
    from typer.testing import CliRunner

    from mdcache.cli import app as mdcache_app
    from mdtrain.cli import app as mdtrain_app

    runner = CliRunner()
    for app in (mdcache_app, mdtrain_app):
        for name in typer.main.get_command(app).commands:
            r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80"})
            assert r.exit_code == 0, r.output
            assert max(len(line) for line in r.output.splitlines()) <= 80, (name, r.output)
            assert not re.search(r"\d\.\d{8,}", r.output), (name, r.output)
    knn = runner.invoke(mdtrain_app, ["knn", "--help"], env={"COLUMNS": "80"}).output
    assert knn.count("[required]") == 3
    pretrain = " ".join(runner.invoke(mdtrain_app, ["pretrain", "--help"], env={"COLUMNS": "80"}).output.split())
    assert "[default: (75/196)]" in pretrain and "[default: (3/4 4/3)]" in pretrain


def test_cluster_scripts_dry_run_commands_that_the_clis_accept(tmp_path):
    """pipelines/imagenet/{run,slurm_extract,slurm_pretrain}.sh --dry-run: the batch scripts are valid bash, the
    array and node counts are the asked ones, and every mdcache/mdtrain command in them parses with the real
    CLI (an option renamed in the code would fail here, not on a cluster)."""
    import shlex

    import typer

    from mdcache.cli import app as mdcache_app
    from mdtrain.cli import app as mdtrain_app

    env = {**os.environ, "IMAGENET": "s3://bucket/imagenet", "CACHE_ROOT": "s3://bucket/mdcache",
           "CLIP_WEIGHTS": "s3://bucket/ViT-B-16.safetensors", "CACHE": "s3://bucket/mdcache/0123456789abcdef",
           "TASKS": "6", "NODES": "2", "GPUS_PER_NODE": "8", "VENV": str(tmp_path / "venv")}
    apps = {"mdcache": typer.main.get_command(mdcache_app), "mdtrain": typer.main.get_command(mdtrain_app)}
    seen = []
    for script in ("run.sh", "slurm_extract.sh", "slurm_pretrain.sh"):
        p = subprocess.run(["bash", f"pipelines/imagenet/{script}", "--dry-run"], cwd=ROOT, capture_output=True,
                           text=True, env=env)
        assert p.returncode == 0, p.stderr
        (tmp_path / "job.sh").write_text(p.stdout)
        assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
        for line in p.stdout.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "-m" not in words or words[words.index("-m") + 1] not in apps:
                continue
            i = words.index("-m")
            prog, name, args = words[i + 1], words[i + 2], words[i + 3:]
            apps[prog].commands[name].make_context(name, args)  # raises on an unknown option or a bad value
            seen.append(f"{prog} {name}")
    assert {"mdcache extract", "mdcache verify", "mdtrain pretrain", "mdtrain knn", "mdtrain finetune",
            "mdtrain eval"} <= set(seen)
    extract = subprocess.run(["bash", "pipelines/imagenet/slurm_extract.sh", "--dry-run"], cwd=ROOT, env=env,
                             capture_output=True, text=True).stdout
    assert "#SBATCH --array=0-5" in extract and "--root s3://bucket/mdcache" in extract.replace('"', "")
    pretrain = subprocess.run(["bash", "pipelines/imagenet/slurm_pretrain.sh", "--dry-run"], cwd=ROOT, env=env,
                              capture_output=True, text=True).stdout
    assert "#SBATCH --nodes=2" in pretrain and "--nnodes 2 --nproc-per-node 8" in pretrain
    assert "--batch-size 128" in pretrain  # 2048 over 16 ranks
    bad = subprocess.run(["bash", "pipelines/imagenet/slurm_pretrain.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, env={**env, "NODES": "3"})
    assert bad.returncode == 2 and "not a multiple" in bad.stderr
