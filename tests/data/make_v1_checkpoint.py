"""Make tests/data/v1_tiny_best.ckpt and its expected figures with HandCLIP 0.1.0 (commit aaa6b8d + tests)."""
import json
import shutil
import sys
from pathlib import Path

import torch

from handclip.config import compose
from handclip.data.protocol import prepare_dataset
from handclip.data.synthetic import generate_dataset
from handclip.eval import evaluate
from handclip.train import train

work = Path("/tmp/v1work"); shutil.rmtree(work, ignore_errors=True)
generate_dataset(work / "raw", subjects=16, images_per_aspect=3, seed=3, size=(96, 72), workers=1)
prepare_dataset(work / "raw", work / "splits", seed=0, runs=3)
common = ["experiment=demo", "hand=dorsal_right", f"paths.data_dir={work/'splits'}", f"paths.output_root={work/'out'}",
          f"paths.cache_dir={work/'cache'}", "data.progress=false", "data.cache_workers=0"]
train(compose("train", common + ["trainer.max_epochs=2", "seed=5", "trainer.deterministic=true",
                                 "trainer.enable_progress_bar=false", "+callbacks.best_checkpoint.save_weights_only=true"]))
ckpt = work / "out/train/dorsal_right/checkpoints/best.ckpt"
(entry,) = evaluate(compose("eval", common + [f"ckpt_path={ckpt}"]))["entries"]
dst = Path(sys.argv[1])
shutil.copyfile(ckpt, dst / "v1_tiny_best.ckpt")
info = json.loads((work / "splits/split_info.json").read_text())
expected = {"made_by": "handclip 0.1.0 (git aaa6b8d), tests/data/README.md",
            "synthetic": {"subjects": 16, "images_per_aspect": 3, "seed": 3, "size": [96, 72]},
            "prepare": {"seed": 0, "runs": 3}, "hand": "dorsal_right",
            "listing_sha256": info["hands"]["dorsal_right"]["listing_sha256"],
            "runs": [{k: r[k] for k in ("run", "rank1", "rank5", "rank10", "mAP", "num_valid_queries", "gallery_size")} for r in entry["runs"]]}
(dst / "v1_tiny_best.json").write_text(json.dumps(expected, indent=2) + "\n")
print(json.dumps(expected, indent=1))
c = torch.load(dst / "v1_tiny_best.ckpt", weights_only=True)
# Keep the repository small: drop the text tower's 6.3 MB vocabulary table (never used by HandCLIP).
del c["state_dict"]["clip.token_embedding.weight"]
torch.save(c, dst / "v1_tiny_best.ckpt")
# Fingerprint of the synthetic photos and CSV (raw_sha256 in the JSON).
import hashlib

h = hashlib.sha256()
for p in sorted((work / "raw" / "Hands").iterdir()):
    h.update(p.name.encode())
    h.update(p.read_bytes())
h.update((work / "raw" / "HandInfo.csv").read_bytes())
print("raw_sha256", h.hexdigest())
