"""What a study that is still running (or was cut short) has measured so far, without running anything.

    python pipelines/study/partial.py --out runs/study [--md runs/study/partial.md]

Reads the teacher's anchors and every finished student (`students/<arm>/seed<k>/eval.json`) and prints one
row per finished (arm, seed), then the seed-paired differences to the online arm where both are finished,
with the same statistics and verdict rule as the full report (run.py). A verdict needs at least two pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import MARGIN, TOP1, arm_verdict, ci, paired  # noqa: E402 (the study's own statistics)

METRICS = ("heldout_loss", "train_fresh_loss", "train_stored_loss", "knn_top1", "linprobe_top1", "finetune_top1")


def finished(out: str) -> dict[str, list[dict]]:
    """{arm folder: [eval.json of each finished seed]}, arms in folder order."""
    root, arms = os.path.join(out, "students"), {}
    for arm in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for seed_dir in sorted(os.listdir(os.path.join(root, arm))):
            path = os.path.join(root, arm, seed_dir, "result.json" if arm == "scratch" else "eval.json")
            if seed_dir.startswith("seed") and os.path.exists(path):  # scratch finetunes keep only their result
                with open(path) as f:
                    arms.setdefault(arm, []).append({"seed": int(seed_dir.removeprefix("seed")), **json.load(f)})
    return arms


def report(out: str) -> str:
    lines = []
    anchors = os.path.join(out, "teacher", "anchors.json")
    if os.path.exists(anchors):
        with open(anchors) as f:
            a = json.load(f)
        t, px = a["teacher"], a["raw_pixels"]
        if t:  # a study of a given teacher (--teacher) has no classifier numbers for it
            lines.append(f"teacher: test top-1 {t['test_top1']:.2f}, k-NN {t['knn_top1']:.2f}, linear probe "
                         f"{t['linprobe_top1']:.2f}")
        lines += [f"raw pixels: k-NN {px['knn_top1']:.2f}, linear probe {px['linprobe_top1']:.2f}", ""]
    arms = finished(out)
    scratch = [r for r in arms.pop("scratch", [])]
    lines += ["| arm | seed | " + " | ".join(METRICS) + " |", "|" + " --- |" * (len(METRICS) + 2)]
    for arm, runs in arms.items():
        for r in runs:
            lines.append(f"| {arm} | {r['seed']} | " + " | ".join(
                f"{r[m]:.4f}" if m.endswith("loss") and m in r else f"{r[m]:.2f}" if m in r else "-"
                for m in METRICS) + " |")
    for r in scratch:
        lines.append(f"| scratch | {r['seed']} | " + " | ".join(
            f"{r['finetune_top1']:.2f}" if m == "finetune_top1" else "-" for m in METRICS) + " |")
    online = arms.get("online-fresh", [])
    pairs = []
    for arm, runs in arms.items():
        if arm in ("online-fresh", "random-init") or not online:
            continue
        vs = {key: paired(runs, online, key) for key in (*TOP1, "heldout_loss")}
        pairs += [f"{arm} - online, {key}: {ci(p)}" for key, p in vs.items() if p["n"]]
        if vs["knn_top1"]["n"]:
            pairs.append(f"{arm}: {arm_verdict(vs)}")
    for arm, runs in arms.items():
        p = paired(runs, scratch, "finetune_top1", rule="sign")
        if p["n"]:
            pairs.append(f"{arm} - scratch, finetune_top1: {ci(p)}")
    if pairs:
        lines += ["", f"Seed-paired differences, mean [95% interval] (n seeds): verdict (margin +-{MARGIN} points "
                  "on top-1 against online; scratch and losses against zero):", ""]
        lines += [f"- {p}" for p in pairs]
    if not arms:
        lines.append("(no student has finished yet)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study", help="the study's folder")
    p.add_argument("--md", default=None, help="also write the report to this file")
    a = p.parse_args(argv)
    text = report(a.out)
    print(text, end="")
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
