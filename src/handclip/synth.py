"""Generate synthetic hand photographs in the raw 11k Hands (or HD) format.

Usage::

    python -m handclip.synth --out data/raw_synth [--dataset 11k|hd] [--subjects 40] [--images-per-aspect 6]
                             [--seed 0] [--size 320x240] [--workers N] [--overwrite] [--contact-sheet PNG]

Writes ``<out>/Hands/*.jpg`` and ``<out>/HandInfo.csv`` (11k), or ``<out>/Original Images/1-501`` and
``.../502-712`` (hd); turn them into split folders with
``python -m handclip.prepare [--dataset hd] --raw <out> --out <data root>``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from handclip.data.synthetic import (
    DEFAULT_SIZE,
    MAX_SUBJECTS,
    contact_sheet,
    generate_dataset,
    generate_hd_dataset,
    parse_size,
)
from handclip.errors import exit_on_error
from handclip.utils.cli import HelpFormatter, add_overwrite_flag

EPILOG = """examples:
  python -m handclip.synth --out data/demo/raw --subjects 40 --images-per-aspect 10
  python -m handclip.synth --out data/raw_synth --subjects 200 --size 1600x1200 --seed 1 --overwrite
  python -m handclip.synth --dataset hd --out data/hd_synth --subjects 60 --size 640x480

outputs: <out>/Hands/*.jpg and <out>/HandInfo.csv in the format of the 11k Hands download (hd: <out>/Original
Images/1-501 and 502-712); same seed, same bytes. Split them with: python -m handclip.prepare [--dataset hd]
--raw <out> --out <data root>. A non-empty --out is replaced only with --overwrite.
Also installed as: handclip-synth
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m handclip.synth", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True,
                        help="output folder (gets Hands/ and HandInfo.csv, or Original Images/)")
    parser.add_argument("--dataset", choices=("11k", "hd"), default="11k",
                        help="11k: four aspects per subject (default); hd: dorsal right photographs in HD's "
                             "1-501 / 502-712 layout (train, test and distractor subjects in HD's proportions)")
    parser.add_argument("--subjects", type=int, default=40,
                        help=f"number of identities, 1..{MAX_SUBJECTS} (default 40)")
    parser.add_argument("--images-per-aspect", type=int, default=6,
                        help="typical images per identity and aspect; each varies by up to +-2, at least 2 (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed gives identical files (default 0)")
    parser.add_argument("--size", default="x".join(map(str, DEFAULT_SIZE)),
                        help="image size WIDTHxHEIGHT, up to 1600x1200 (default 320x240)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: CPU count, max 8)")
    add_overwrite_flag(parser, "allow a non-empty --out; its Hands/ and HandInfo.csv are replaced")
    parser.add_argument("--contact-sheet", metavar="PNG", default=None,
                        help="also write a contact sheet (4 identities x 4 aspects x 2 images) to this PNG")
    return parser


class _Progress:
    """Print a progress line every ~10%."""

    def __init__(self) -> None:
        self.next_pct = 10

    def __call__(self, done: int, total: int) -> None:
        pct = 100 * done // total
        if pct >= self.next_pct or done == total:
            print(f"  {done}/{total} images", file=sys.stderr, flush=True)
            self.next_pct = pct - pct % 10 + 10


@exit_on_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = parse_size(args.size)
    print(f"generating {args.subjects} synthetic subjects at {size[0]}x{size[1]} into {args.out}", flush=True)
    generate = generate_hd_dataset if args.dataset == "hd" else generate_dataset
    summary = generate(args.out, subjects=args.subjects, images_per_aspect=args.images_per_aspect,
                       seed=args.seed, size=size, overwrite=args.overwrite, workers=args.workers, progress=_Progress())
    what = f"into {summary.csv_path}" if args.dataset == "hd" else f"and {summary.csv_path}"
    print(f"wrote {summary.images} images ({summary.accessory_images} with accessories) of {summary.subjects} "
          f"subjects {what} in {summary.seconds:.1f} s")
    if args.contact_sheet:
        print(f"wrote contact sheet {contact_sheet(args.contact_sheet, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
