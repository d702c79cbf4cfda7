"""The four hand types of 11k Hands, defined once: names, folder suffixes and published id thresholds.

Everything else (the split protocol, the layout reader, the synthetic generator, the configs in
``configs/hand/``, the Makefile and the tests) takes them from here or is checked against them by a test.
"""

from __future__ import annotations

from handclip.errors import HandCLIPError

#: HandCLIP hand type name -> folder suffix used by the published split script.
HAND_TYPES: dict[str, str] = {
    "dorsal_right": "dorsal_r",
    "dorsal_left": "dorsal_l",
    "palmar_right": "palmar_r",
    "palmar_left": "palmar_l",
}

#: The published protocol (Afifi 2019): identities with id at or below the threshold train, the rest test.
PUBLISHED_THRESHOLDS: dict[str, int] = {
    "dorsal_right": 1050,
    "dorsal_left": 1037,
    "palmar_right": 1051,
    "palmar_left": 1042,
}

#: Every hand type has its folder ``<data root>/train_val_test_split_<suffix>``.
HAND_DIR_PREFIX = "train_val_test_split_"


def check_hand(hand: str) -> str:
    """Return ``hand`` if it is a known hand type, else raise an error listing the valid ones."""
    if hand not in HAND_TYPES:
        raise HandCLIPError(f"unknown hand type {hand!r}; expected one of: {', '.join(HAND_TYPES)}")
    return hand


def hand_dir_name(hand: str) -> str:
    """Folder name of a hand type, e.g. ``dorsal_right`` -> ``train_val_test_split_dorsal_r``."""
    return HAND_DIR_PREFIX + HAND_TYPES[check_hand(hand)]


def aspect_of_hand(hand: str) -> str:
    """The hand type as HandInfo.csv's ``aspectOfHand`` column writes it: ``dorsal_right`` -> ``dorsal right``."""
    return check_hand(hand).replace("_", " ")
