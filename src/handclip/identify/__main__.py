"""Identify hand photos against a gallery: top-k identities, scores, and a calibrated decision (or "unknown").

    python -m handclip.identify ckpt_path=outputs/train/dorsal_right/checkpoints/best.ckpt \
        gallery=path/to/gallery query=path/to/photo.jpg            # or a folder, or a quoted 'glob/*.jpg'
    python -m handclip.identify ... top_k=10 target_fmr=0.001 name=case42 index=path/to/index
    python -m handclip.identify fusion=mean gallery=<person>/<hand type>/ query=CASES threshold=0.8   # fused
    python -m handclip.identify task=train_hand_type          # the hand-type classifier that routes photos

Writes outputs/identify/<name>/results.json, results.csv and rankings/*.png (see configs/identify.yaml).
"""

from omegaconf import DictConfig

from handclip.command_line import hydra_entry


@hydra_entry("identify")
def main(cfg: DictConfig) -> None:
    # torch and open_clip: after the command line is checked
    if cfg.task == "train_hand_type":
        from handclip.identify.hand_training import train_hand_classifier

        train_hand_classifier(cfg)
        return
    from handclip.identify.run import identify

    identify(cfg)


if __name__ == "__main__":
    main()
