"""Score re-identification on the test query/gallery runs: zero-shot CLIP and fine-tuned HandCLIP.

    python -m handclip.eval hand=dorsal_right ckpt_path=outputs/train/dorsal_right/checkpoints/best.ckpt
    python -m handclip.eval hand=dorsal_right                 # zero-shot model given by `model`
    python -m handclip.eval all=true                          # every hand type: the comparison table
    python -m handclip.eval all=true cross_hand=true          # + person across hand types (fusion)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from handclip.command_line import hydra_entry
from handclip.errors import HandCLIPError
from handclip.hands import check_hand
from handclip.training.trackers import check_loggers_installed, log_test_summary

# torch, Lightning and open_clip are imported when the job runs (as in handclip.train): a mistyped option
# on the command line is answered before they load.


def evaluate(cfg: DictConfig) -> dict:
    """Score as configured, write the report files, return ``{"entries": [...], "files": {...}}``."""
    check_loggers_installed(cfg.get("logger"))  # before torch loads
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from handclip.data.layout import available_hands
    from handclip.evaluation.compare import ScoreOptions, compare_hands, score_checkpoint, score_zero_shot
    from handclip.evaluation.plots import write_figures
    from handclip.evaluation.report import (
        check_report_target,
        markdown_table,
        report_name,
        slug,
        table_rows,
        write_report,
    )
    from handclip.evaluation.rerank import Rerank, rerank_entries, template_entries
    from handclip.evaluation.verification import VerificationOptions
    from handclip.evaluation.verification_report import verification_markdown
    from handclip.models.checkpoint import read_checkpoint_meta
    from handclip.models.encoder import zero_shot_encoder
    from handclip.run_folder import check_folders_writable, run_name
    from handclip.utils.devices import resolve_device

    check_folders_writable(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    out_dir = Path(cfg.paths.output_root) / "eval"
    tta = (cfg.get("eval") or {}).get("tta")  # null: each checkpoint's own (none for the zero-shot model)
    ver = cfg.verification
    verification = VerificationOptions(
        fmr_levels=tuple(ver.fmr_levels), target_fmr=ver.target_fmr, cmc_max_rank=ver.cmc_max_rank,
        examples=ver.examples, top_k=ver.top_k) if ver.enabled else None
    rerank = Rerank(**cfg.rerank) if cfg.get("rerank") else None
    options = ScoreOptions(device=resolve_device(cfg.device), ranks=tuple(cfg.metrics.ranks), ap=cfg.metrics.ap,
                           cross_aspect=cfg.metrics.cross_aspect, progress=cfg.data.progress,
                           verification=verification, calibration_dir=out_dir, rerank=rerank, tta=tta,
                           gallery_mode=cfg.get("gallery_mode") or "max")

    def data_for(hand, preprocess):
        return instantiate(cfg.data, hand=hand, _partial_=True)(preprocess=preprocess)

    model = cfg.model
    cross_hand = None
    if cfg.cross_hand:
        from handclip.evaluation.cross_hand import plan_cross_hand, run_cross_hand

        if not cfg.all:
            raise HandCLIPError("cross_hand=true scores every hand type with its own model: pass all=true too")
        cross_hand = plan_cross_hand(cfg, out_dir)  # every check before any work
    if cfg.all:
        hands = available_hands(cfg.data.root)
        if not hands:
            raise HandCLIPError(f"no hand folders under {cfg.data.root}; prepare data or run `make demo`")
        encoder = zero_shot_encoder(model.model_name, model.pretrained, model.cache_dir, tta=tta)
        entries = compare_hands(hands, encoder, model.model_name, model.pretrained, cfg.paths.output_root,
                                data_for, options)
        stem = cfg.name or "comparison"
    else:
        hand = check_hand(cfg.hand.name)
        ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve() if cfg.ckpt_path else None
        run = run_name(ckpt, cfg.paths.output_root) if ckpt else None
        stem = slug(cfg.name) if cfg.name else report_name(hand, ckpt, run)
        meta = read_checkpoint_meta(ckpt) if ckpt else {}
        check_report_target(out_dir, stem, [{"hand": hand, "checkpoint": str(ckpt) if ckpt else None,
                                             "model_name": meta.get("model_name", model.model_name),
                                             "pretrained": meta.get("pretrained", model.pretrained)}], cfg.overwrite)
        if ckpt:
            entries = [score_checkpoint(ckpt, hand, data_for, options, cfg.allow_hand_mismatch, run=run or "")]
        else:
            encoder = zero_shot_encoder(model.model_name, model.pretrained, model.cache_dir, tta=tta)
            entries = [score_zero_shot(encoder, model.model_name, model.pretrained, hand, data_for, options)]
    entries = [row for entry in entries for row in (entry, *template_entries(entry), *rerank_entries(entry))]
    files = write_report(entries, out_dir, OmegaConf.to_container(cfg, resolve=True), stem=stem)
    if verification is not None and ver.pictures:
        files.update(write_figures(entries, out_dir, stem))
    print(markdown_table(table_rows(entries)) + verification_markdown(entries), end="")
    if cross_hand is not None:
        files.update(run_cross_hand(cross_hand, cfg, data_for, options.device, tta, out_dir,
                                    OmegaConf.to_container(cfg, resolve=True)))
    print(f"written: {', '.join(str(p) for p in files.values())}")
    log_test_summary(cfg.get("logger"), entries, {"hand": "all" if cfg.all else cfg.hand.name,
                                                  "ckpt_path": cfg.ckpt_path, "model": model.model_name})
    return {"entries": entries, "files": files}


@hydra_entry("eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
