"""The training step on 1 and on N processes (data-parallel, as Lightning's DDP runs it).

Each process count runs in fresh processes (``torch.multiprocessing``, spawn) joined by
``torch.distributed`` (gloo on the CPU, NCCL with one GPU per process), with HandCLIPModule wrapped in
``DistributedDataParallel`` as Lightning's DDP strategy wraps it, the module's own AdamW, and per-process
batches of ``batch_size`` random crops. A step is timed from a barrier to the end of the optimizer step
and its time is the slowest process's. Every count is timed twice, step by step in turn: with the
gradient all-reduce, and under ``no_sync()`` (the same step without it); the share of a step spent syncing gradients is
``1 - no_sync / sync`` (what the all-reduce adds to the step, after its overlap with the backward pass).
On the CPU the processes share the same cores (each gets cores / N threads, as Lightning sets them), so
N processes cannot be faster than one: the figures show what DDP costs there, not what it gains.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from handclip.bench.measure import ratio, summary
from handclip.bench.train import build_module
from handclip.utils.devices import usable_cpus

Say = Callable[[str], None]


def _steps(model, module, optimizer, images, labels, device: torch.device, total: int, sync: bool) -> list[float]:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    no_sync = model.no_sync if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext
    times = []
    for _ in range(total):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        with no_sync():  # around forward and backward, as DDP requires
            with autocast:
                loss = module.loss_fn(model(images), labels)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, world: int, s: dict, device_type: str, threads: int, init_file: str, out_file: str,
            spawned: float) -> None:
    """One process: DDP-wrapped HandCLIPModule, timed steps with and without the all-reduce."""
    torch.set_num_threads(threads)
    device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=world)
    try:
        torch.manual_seed(int(s["seed"]))
        module = build_module(s["model_name"], int(s["num_classes"]), float(s["lr"]), float(s["weight_decay"]))
        module.to(device).train()
        model = module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(module, device_ids=[rank] if device.type == "cuda" else None)
        optimizer = module.configure_optimizers()
        startup = time.time() - spawned  # process start, imports, process group, model built and wrapped
        generator = torch.Generator().manual_seed(int(s["seed"]) + rank)
        size = tuple(int(v) for v in module.encoder.preprocess.input_size)
        batch = int(s["batch_size"])
        images = torch.randint(0, 256, (batch, *size), dtype=torch.uint8, generator=generator).to(device)
        labels = torch.randint(0, int(s["num_classes"]), (batch,), generator=generator).to(device)
        warmup, steps = int(s["warmup_steps"]), int(s["steps"])
        # Steps with and without the all-reduce alternate, so that a change in the machine's load meets both.
        timed: dict[bool, list[float]] = {True: [], False: []}
        for step in range(warmup + steps):
            for sync in (True, False) if world > 1 else (True,):
                took = _steps(model, module, optimizer, images, labels, device, 1, sync)
                if step >= warmup:
                    timed[sync] += took
        allreduce = None
        if world > 1:  # the gradient volume alone, all-reduced as one flat tensor (no overlap with compute)
            flat = torch.zeros(sum(p.numel() for p in module.parameters() if p.requires_grad), device=device)
            allreduce = []
            for _ in range(1 + steps):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(flat)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                allreduce.append(time.perf_counter() - start)
            allreduce = allreduce[1:]
        mine = {"startup_s": startup, "sync": timed[True], "no_sync": timed[False] or None, "allreduce": allreduce,
                "parameters": sum(p.numel() for p in module.parameters() if p.requires_grad)}
        everyone = [None] * world
        if world > 1:
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        if rank == 0:
            Path(out_file).write_text(json.dumps(everyone))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _slowest(per_rank: list[list[float]]) -> list[float]:
    """Per step, the slowest process's time (the step ends when every process has finished it)."""
    return [max(step) for step in zip(*per_rank)]


def _run(world: int, s: dict, device_type: str, threads: int, scratch: Path) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.start_processes(_worker, args=(world, s, device_type, threads, init_file, out_file, time.time()),
                           nprocs=world, join=True, start_method="spawn")
        return json.loads(Path(out_file).read_text())


def bench_scaling(s: dict, device: torch.device, scratch: Path, seed: int, say: Say):
    """images/s of the training step on each process count, speedup over one process, gradient-sync share."""
    s = {**s, "seed": seed}
    scratch.mkdir(parents=True, exist_ok=True)
    cores = usable_cpus()
    available = torch.cuda.device_count() if device.type == "cuda" else cores
    batch = int(s["batch_size"])
    result: dict = {"model_name": s["model_name"], "batch_size_per_process": batch, "device_type": device.type,
                    "backend": "nccl" if device.type == "cuda" else "gloo", "cores": cores, "processes": {}}
    base_ips = None
    for world in sorted({int(n) for n in s["processes"]}):
        if world > available:
            what = "GPUs" if device.type == "cuda" else "CPU cores"
            say(f"  {world} processes: skipped, this machine has {available} {what}")
            result["processes"][str(world)] = {"skipped": f"needs {world} {what}, this machine has {available}"}
            continue
        # As Lightning sets them for N processes on one machine: the cores shared out (at least 1 thread).
        threads = max(1, cores // world)
        how = "with and without the gradient all-reduce" if world > 1 else "(no DDP: the single-device baseline)"
        say(f"  {world} process(es) x batch {batch} ({result['backend']}, {threads} thread(s) each), "
            f"{s['warmup_steps']}+{s['steps']} steps {how} ...")
        started = time.perf_counter()
        ranks = _run(world, s, device.type, threads, scratch)
        step = _slowest([r["sync"] for r in ranks])
        entry = {"threads_per_process": threads, "global_batch": world * batch,
                 "images_per_s": world * batch / statistics.median(step), "step": summary(step),
                 "wall_s": round(time.perf_counter() - started, 1), "parameters": ranks[0]["parameters"],
                 # from spawning the processes to all of them ready to step (imports, process group, model)
                 "startup_s": max(r["startup_s"] for r in ranks)}
        if world > 1:
            no_sync = _slowest([r["no_sync"] for r in ranks])
            allreduce = _slowest([r["allreduce"] for r in ranks])
            entry.update({
                "images_per_s_no_sync": world * batch / statistics.median(no_sync),
                "step_no_sync": summary(no_sync),
                "grad_sync_share": max(0.0, 1 - statistics.median(no_sync) / statistics.median(step)),
                "allreduce_s": statistics.median(allreduce),
                "allreduce_share_if_not_overlapped": statistics.median(allreduce) / statistics.median(step),
                "allreduce_gb_per_s": ranks[0]["parameters"] * 4 / 1e9 / statistics.median(allreduce),
            })
        if base_ips is None and world == 1:
            base_ips = entry["images_per_s"]
        if base_ips is not None and world > 1:
            entry["speedup_vs_1"] = ratio(entry["images_per_s"], base_ips)
            entry["efficiency_vs_linear"] = entry["speedup_vs_1"] / world
            if device.type == "cuda":
                result[f"cuda_efficiency_{world}"] = entry["efficiency_vs_linear"]
        result["processes"][str(world)] = entry
    return result
