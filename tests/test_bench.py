"""`python -m harness.bench`: every recipe can be benchmarked on synthetic data, image folders included."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_an_image_folder_recipe_benchmarks_on_synthetic_images(tmp_path):
    """imagenet-r50-v2 without ImageNet: random images of the recipe's size through both augmentation
    paths (tiny sizes here; the device check runs the real ones on a GPU)."""
    sets = ["model.arch=resnet18", "optim.batch_size=16", "data.image_size=32", "moco.queue_size=64", "runtime.device=cpu",
            "moco.shuffle_bn=split", "moco.bn_splits=2", "data.num_workers=0"]
    cmd = [sys.executable, "-m", "harness.bench", "train", "--recipe", "imagenet-r50-v2", "--synthetic", "32",
           "--steps", "1", "--warmup", "1", "--repeats", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = tmp_path.glob("bench-train-*.json")
    rows = json.loads(report.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {r["path"] for r in rows} == {"batched", "per_image"}
    assert all(r["recipe"] == "imagenet-r50-v2" and r["arch"] == "resnet18" and r["images_per_s"] > 0 for r in rows)
