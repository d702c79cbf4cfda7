"""Pictures of an evaluation (matplotlib, no display needed): a CMC curve per hand type with zero-shot and
fine-tuned on one plot, a ROC/DET plot, and ranking pictures of the best and worst queries per hand type.

Drawn from the report entries (the figures in ``<stem>.json``), so they always show what the table says.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from matplotlib.figure import Figure  # the object-oriented API: no pyplot state, no GUI backend

from handclip.evaluation.pictures import Row, Tile, match_colour, ranking_picture
from handclip.evaluation.report import FINE_TUNED, ZERO_SHOT
from handclip.hands import HAND_TYPES
from handclip.utils.files import atomic_write

log = logging.getLogger(__name__)

_STYLE = {ZERO_SHOT: ("--", "tab:gray"), FINE_TUNED: ("-", "tab:blue")}
_HAND_COLOURS = dict(zip(HAND_TYPES, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))


def save_png(fig: Figure, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (the folder is created)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, buf.getvalue(), durable=False)


def _with_verification(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e.get("status", "ok") == "ok" and e.get("verification", {}).get("runs")]


def cmc_plot(hand: str, entries: list[dict], path: Path) -> Path:
    """Rank-1..20 (mean over the runs, ± std band) of every model scored on ``hand``."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for entry in entries:
        cmc = entry["verification"]["cmc"]
        ranks = cmc["ranks"]
        mean = [100 * v for v in cmc["mean"]]
        std = [100 * v for v in cmc["std"]]
        style, colour = _STYLE.get(entry["model"], ("-", None))
        ax.plot(ranks, mean, style, marker="o", markersize=3, color=colour,
                label=f"{entry['model']} (Rank-1 {mean[0]:.1f} %)")
        ax.fill_between(ranks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=colour, alpha=0.15, linewidth=0)
    runs = entries[0]["verification"]["summary"]["num_runs"]
    gallery = entries[0].get("summary", {}).get("gallery_size")
    ax.set(xlabel="rank k", ylabel="queries with a true match in the top k (%)", ylim=(0, 100.5),
           title=f"CMC, {hand} (mean ± std over {runs} runs" + (f", gallery {gallery:g})" if gallery else ")"))
    ax.set_xticks(ranks if len(ranks) <= 20 else ranks[::2])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return save_png(fig, path)


def roc_det_plot(entries: list[dict], path: Path) -> Path:
    """ROC (TAR against FMR) and DET (FNMR against FMR) of every (hand, model), runs pooled."""
    fig = Figure(figsize=(12, 4.8))
    roc, det = fig.subplots(1, 2)
    for entry in entries:
        v = entry["verification"]
        curve = v["curve"]
        points = [(f, t) for f, t in zip(curve["fmr"], curve["tar"]) if f > 0]
        if not points:
            continue
        fmr, tar = zip(*points)
        style = "--" if entry["model"] == ZERO_SHOT else "-"
        colour = _HAND_COLOURS.get(entry["hand"])
        short = "zero-shot" if entry["model"] == ZERO_SHOT else (entry.get("run") or "fine-tuned")
        label = f"{entry['hand']}, {short} (EER {100 * curve['eer']:.1f} %)"
        roc.plot(fmr, tar, style, color=colour, label=label)
        fnmr = [(f, 1 - t) for f, t in points if t < 1]
        if fnmr:
            det.plot(*zip(*fnmr), style, color=colour, label=label)
        at = curve.get("at_threshold")
        if at and at["fmr"] > 0:
            roc.plot([at["fmr"]], [at["tar"]], "o", color=colour)
            if at["tar"] < 1:
                det.plot([at["fmr"]], [1 - at["tar"]], "o", color=colour)
    roc.set(xscale="log", xlabel="false match rate (FMR)", ylabel="true accept rate (TAR)", ylim=(0, 1.01),
            title="ROC (test runs pooled; dots: threshold calibrated on val)")
    det.set(xscale="log", yscale="log", xlabel="false match rate (FMR)", ylabel="false non-match rate (FNMR)",
            title="DET (log-log)")
    for ax in (roc, det):
        ax.grid(alpha=0.3, which="both")
    roc.legend(fontsize=8, loc="lower right")
    return save_png(fig, path)


def _example_rows(entry: dict) -> list[Row]:
    rows = []
    for ex in entry["verification"]["examples"]:
        items = [Tile(t["path"], [f"{i}. {t['identity']}", f"score {t['score']:.3f}", Path(t["path"]).name],
                      match_colour(t["match"])) for i, t in enumerate(ex["top"], 1)]
        heading = f"{ex['kind']}: query of {ex['identity']}, its identity ranked {ex['rank']}"
        rows.append(Row(heading, Tile(ex["query"], ["query", ex["identity"], Path(ex["query"]).name], (31, 119, 180)),
                        items))
    return rows


def write_figures(entries: list[dict], out_dir: Path, stem: str) -> dict[str, Path]:
    """``<stem>_cmc_<hand>.png`` per hand type, ``<stem>_roc_det.png``, ``<stem>_ranking_<hand>.png``."""
    scored = _with_verification(entries)
    files: dict[str, Path] = {}
    hands = [h for h in HAND_TYPES if any(e["hand"] == h for e in scored)]
    hands += sorted({e["hand"] for e in scored} - set(hands))
    for hand in hands:
        mine = sorted((e for e in scored if e["hand"] == hand), key=lambda e: e["model"] != ZERO_SHOT)
        files[f"cmc_{hand}"] = cmc_plot(hand, mine, out_dir / f"{stem}_cmc_{hand}.png")
        # the plain run's fine-tuned model when there is one, else the last scored
        shown = next((e for e in mine if e["model"] == FINE_TUNED), mine[-1])
        rows = _example_rows(shown)
        if rows:
            run = shown["verification"].get("example_run")
            files[f"ranking_{hand}"] = ranking_picture(
                rows, out_dir / f"{stem}_ranking_{hand}.png",
                title=f"{hand}, {shown['model']}: best and worst queries of {run} "
                      f"(top-{len(rows[0].items)} identities)")
    if scored:
        files["roc_det"] = roc_det_plot(scored, out_dir / f"{stem}_roc_det.png")
    return files
