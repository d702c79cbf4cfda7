"""The deliberate bugs of issue 8, planted one at a time in a scratch copy: each must fail at least one fast test.

    python tests/planted_bugs.py            # all of them (a few minutes on 2 cores)
    python tests/planted_bugs.py delta val  # those whose name contains one of the words

Prints KILLED or SURVIVED per bug (with the first failing test) and exits 1 when one survived. A bug whose code
moved (the text to replace is not found exactly once) is reported as such: update its entry.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1])
MUTATIONS = [  # (name, file, text, replaced by, test file)
    (
        'split <= to <',
        'src/handclip/data/split/plan.py',
        '[i for i in ids if int(i) <= threshold], [i for i in ids if int(i) > threshold]',
        '[i for i in ids if int(i) < threshold], [i for i in ids if int(i) >= threshold]',
        'tests/test_prepare.py',
    ),
    (
        'threshold 1050->1000',
        'src/handclip/hands.py',
        '"dorsal_right": 1050,',
        '"dorsal_right": 1000,',
        'tests/test_prepare.py',
    ),
    (
        'two-image no val',
        'src/handclip/data/split/plan.py',
        'if len(images[i]) == 1:',
        'if len(images[i]) <= 2:',
        'tests/test_prepare.py',
    ),
    (
        'verify no-op',
        'src/handclip/data/split/write.py',
        '    problems = [f"{plan.folder}: {p}"',
        '    return\n    problems = [f"{plan.folder}: {p}"',
        'tests/test_prepare.py',
    ),
    (
        'val first',
        'src/handclip/data/split/plan.py',
        'val = rng.choice(images[i])',
        'val = images[i][0]',
        'tests/test_prepare.py',
    ),
    (
        'cache key no size',
        'src/handclip/data/cache_keys.py',
        'return str(resolved), st.st_size, st.st_mtime_ns',
        'return str(resolved), 0, st.st_mtime_ns',
        'tests/test_cache.py',
    ),
    (
        'resume other model',
        'src/handclip/run_folder.py',
        'for key in ("model_name", "hand"):',
        'for key in ("hand",):',
        'tests/test_train.py',
    ),
    (
        'tower detached',
        'src/handclip/models/encoder.py',
        '        return self.visual(images)\n',
        '        return self.visual(images).detach()\n',
        'tests/test_train.py',
    ),
    (
        'eval ignores ap',
        'src/handclip/eval.py',
        'ap=cfg.metrics.ap,',
        'ap="standard",',
        'tests/test_eval.py',
    ),
    (
        'delta sign',
        'src/handclip/evaluation/report.py',
        'diff = 100 * (entry["summary"][key]["mean"] - baseline["summary"][key]["mean"])',
        'diff = 100 * (baseline["summary"][key]["mean"] - entry["summary"][key]["mean"])',
        'tests/test_eval.py',
    ),
    (
        'score wrong gallery labels',
        'src/handclip/evaluation/runs.py',
        'compute_reid_metrics(features[q], labels[q], features[g], labels[g], ranks=ranks, ap=ap',
        'compute_reid_metrics(features[q], labels[q], features[g].flip(0), labels[g], ranks=ranks, ap=ap',
        'tests/test_eval.py',
    ),
    (
        'device_batches ignored',
        'src/handclip/data/datamodule.py',
        '        if self.device_batches is True:\n            return True',
        '        if self.device_batches is True:\n            return False',
        'tests/test_train.py',
    ),
    (
        'batch 64->32',
        'configs/data/hands.yaml',
        'batch_size: 64',
        'batch_size: 32',
        'tests/test_train.py',
    ),
    (
        'precision bf16',
        'configs/trainer/default.yaml',
        'precision: 32-true',
        'precision: bf16-mixed',
        'tests/test_train.py',
    ),
    (
        'scheduler',
        'src/handclip/models/module.py',
        '        return optimizer\n',
        "        return {'optimizer': optimizer, 'lr_scheduler': torch.optim.lr_scheduler.StepLR(optimizer, 1)}\n",
        'tests/test_train.py',
    ),
    (
        'best = last',
        'configs/callbacks/default.yaml',
        '  monitor: val/rank1\n  mode: max',
        '  monitor: val/rank1\n  mode: min',
        'tests/test_train.py',
    ),
]
SKIP = ("outputs", "data", ".cache", ".venv", "mutants", "docs", "benchmarks")  # top-level folders not copied


def plant(name: str, rel: str, old: str, new: str, tests: str) -> tuple[bool, list[str]]:
    """(killed, first failing test) of one bug planted in a fresh copy of the checkout."""
    scratch = tempfile.mkdtemp(prefix="planted-")
    work = os.path.join(scratch, "repo")
    try:
        shutil.copytree(SRC, work, ignore=lambda d, names: [
            n for n in names if n in ("__pycache__", ".git") or (d == SRC and n in SKIP)])
        path = os.path.join(work, rel)
        text = open(path).read()
        if text.count(old) != 1:
            return False, [f"code moved: the text to replace occurs {text.count(old)} times in {rel}"]
        open(path, "w").write(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": f"{work}/src", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                               tests], cwd=work, env=env, capture_output=True, text=True)
        failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return proc.returncode != 0, failed[:1]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(only: list[str]) -> int:
    results = []
    for name, *bug in MUTATIONS:
        if only and not any(o in name for o in only):
            continue
        killed, failed = plant(name, *bug)
        results.append(killed)
        print(("KILLED  " if killed else "SURVIVED") + f"  {name}  {failed}", flush=True)
    print(f"{sum(results)} / {len(results)} killed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
