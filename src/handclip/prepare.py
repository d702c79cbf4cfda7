"""Build the 11k Hands or HD split folders (the published protocols) from the raw download.

Usage::

    python -m handclip.prepare [--dataset 11k|hd] --raw DIR --out DIR [--seed 0] [--runs 10] [--overwrite]
                               [--split threshold|half] [--thresholds dorsal_right=1050,...] [--cross-aspect]

11k: ``--raw`` holds ``HandInfo.csv`` and ``Hands/``; ``--out`` gets one ``train_val_test_split_<hand>/``
folder per hand type and ``split_info.json``. HD: ``--raw`` holds ``Original Images/1-501`` and
``.../502-712`` (or is ``Original Images``); ``--out`` gets ``train_val_test_split_hd/`` and ``split_info.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from handclip.data.split import DEFAULT_RUNS, SPLIT_MODES, parse_thresholds, prepare_dataset
from handclip.errors import exit_on_error
from handclip.hands import DATASETS, PUBLISHED_THRESHOLDS
from handclip.utils.cli import HelpFormatter, add_overwrite_flag

EPILOG = """examples:
  python -m handclip.prepare --raw /path/to/11k --out data/11k
  python -m handclip.prepare --raw data/demo/raw --out data/demo/splits --runs 2 --overwrite
  python -m handclip.prepare --dataset hd --raw /path/to/hd --out data/hd

outputs: --out gets train_val_test_split_<hand>/ for each hand type (train/, val/, query{i}/, gallery{i}/ per
identity folder; gallery{i}_all/ with --cross-aspect; HD: train_val_test_split_hd/) and split_info.json (seed,
thresholds, counts). A non-empty --out is replaced only with --overwrite, once the new split is complete.
Also installed as: handclip-prepare
"""


def build_parser() -> argparse.ArgumentParser:
    defaults = ",".join(f"{k}={v}" for k, v in PUBLISHED_THRESHOLDS.items())
    parser = argparse.ArgumentParser(prog="python -m handclip.prepare", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="11k",
                        help="11k (11k Hands, default) or hd (PolyU HD dorsal images, MBA-Net's protocol)")
    parser.add_argument("--raw", required=True,
                        help="the download: HandInfo.csv and Hands/ (11k), or Original Images/1-501 and 502-712 (hd)")
    parser.add_argument("--out", required=True, help="output data root for the split folders")
    parser.add_argument("--seed", type=int, default=0, help="random seed for val/gallery picks (default 0)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="query/gallery runs (default 10)")
    parser.add_argument("--split", choices=SPLIT_MODES, default="threshold",
                        help="threshold: split identities by id (published protocol); half: first half of the "
                             "sorted identities of each hand type train, the rest test")
    parser.add_argument("--thresholds", default="", metavar="HAND=ID,...",
                        help=f"override id thresholds for --split threshold (defaults {defaults})")
    parser.add_argument("--cross-aspect", action="store_true",
                        help="also write gallery{i}_all: the four hand types' galleries merged")
    add_overwrite_flag(parser, "replace a non-empty --out (only once the new one is built)")
    return parser


def _summary_lines(info: dict) -> list[str]:
    lines = []
    for hand, h in info["hands"].items():
        c = h["counts"]
        extra = (f"{h['excluded_accessory_images']} accessory images excluded" if "distractors" not in h else
                 f"gallery0 {c['gallery0']['identities']} ids / {c['gallery0']['images']} images with "
                 f"{h['distractors']['identities']} distractor ids / {h['distractors']['images']} images, "
                 f"query0 {c['query0']['identities']} ids / {c['query0']['images']} images")
        lines.append(
            f"{hand:>13}: train_all {c['train_all']['identities']} ids / {c['train_all']['images']} images "
            f"(train {c['train']['images']}, val {c['val']['images']}), test {c['test']['identities']} ids / "
            f"{c['test']['images']} images, {info['runs']} query/gallery runs, {extra}"
        )
    return lines + [f"note: {n}" for n in info["notes"]]


@exit_on_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    thresholds = parse_thresholds(args.thresholds) if args.thresholds else None
    info = prepare_dataset(args.raw, args.out, seed=args.seed, runs=args.runs, thresholds=thresholds,
                           split=args.split, cross_aspect=args.cross_aspect, overwrite=args.overwrite,
                           dataset=args.dataset)
    print("\n".join(_summary_lines(info)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
