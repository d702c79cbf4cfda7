"""Identify hand photos against a gallery: top-k identities, scores, and a calibrated decision (or "unknown").

    python -m handclip.identify ckpt_path=outputs/train/dorsal_right/checkpoints/best.ckpt \
        gallery=path/to/gallery query=path/to/photo.jpg            # or a folder, or a quoted 'glob/*.jpg'
    python -m handclip.identify ... top_k=10 target_fmr=0.001 name=case42 index=path/to/index

Writes outputs/identify/<name>/results.json, results.csv and rankings/*.png (see configs/identify.yaml).
"""

from omegaconf import DictConfig

from handclip.command_line import hydra_entry


@hydra_entry("identify")
def main(cfg: DictConfig) -> None:
    from handclip.identify.run import identify  # torch and open_clip: after the command line is checked

    identify(cfg)


if __name__ == "__main__":
    main()
