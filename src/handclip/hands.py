"""The hand types, defined once: names, datasets, folder suffixes and published id thresholds.

Four come from 11k Hands (one per aspect of the hand), one from HD (PolyU contactless hand dorsal images).
Everything else (the split protocols, the layout reader, the synthetic generator, the configs in
``configs/hand/``, the Makefile and the tests) takes them from here or is checked against them by a test.
"""

from __future__ import annotations

from handclip.errors import HandCLIPError

#: HandCLIP hand type name -> folder suffix used by the published split scripts.
HAND_TYPES: dict[str, str] = {
    "dorsal_right": "dorsal_r",
    "dorsal_left": "dorsal_l",
    "palmar_right": "palmar_r",
    "palmar_left": "palmar_l",
    "hd": "hd",
}

#: The datasets ``python -m handclip.prepare --dataset`` knows, and the hand types each one holds.
DATASETS: dict[str, tuple[str, ...]] = {
    "11k": ("dorsal_right", "dorsal_left", "palmar_right", "palmar_left"),
    "hd": ("hd",),
}

#: The four hand types of 11k Hands, in HandInfo.csv's order of aspects.
ELEVEN_K_HANDS: tuple[str, ...] = DATASETS["11k"]

#: The published protocols: identities with id at or below the threshold train, the rest test
#: (11k Hands: Afifi 2019; HD: MBA-Net's split script, which CLIP-HandID and CLIP-FH reuse).
PUBLISHED_THRESHOLDS: dict[str, int] = {
    "dorsal_right": 1050,
    "dorsal_left": 1037,
    "palmar_right": 1051,
    "palmar_left": 1042,
    "hd": 447,
}

#: Every hand type has its folder ``<data root>/train_val_test_split_<suffix>``.
HAND_DIR_PREFIX = "train_val_test_split_"


def check_hand(hand: str) -> str:
    """Return ``hand`` if it is a known hand type, else raise an error listing the valid ones."""
    if hand not in HAND_TYPES:
        raise HandCLIPError(f"unknown hand type {hand!r}; expected one of: {', '.join(HAND_TYPES)}")
    return hand


def check_eleven_k_hands(hands) -> None:
    """None, or a list of 2 or more different 11k hand types (the person-across-hand-types protocol's)."""
    if hands is not None and (len(hands) < 2 or len(set(hands)) < len(hands)
                              or any(h not in ELEVEN_K_HANDS for h in hands)):
        raise HandCLIPError(f"expected null or 2 or more different 11k hand types of: {', '.join(ELEVEN_K_HANDS)}")


def hand_dir_name(hand: str) -> str:
    """Folder name of a hand type, e.g. ``dorsal_right`` -> ``train_val_test_split_dorsal_r``."""
    return HAND_DIR_PREFIX + HAND_TYPES[check_hand(hand)]


def aspect_of_hand(hand: str) -> str:
    """An 11k hand type as HandInfo.csv's ``aspectOfHand`` column writes it: ``dorsal_right`` -> ``dorsal right``."""
    if hand not in ELEVEN_K_HANDS:
        raise HandCLIPError(f"{hand!r} is not an 11k Hands hand type; expected one of: {', '.join(ELEVEN_K_HANDS)}")
    return hand.replace("_", " ")
