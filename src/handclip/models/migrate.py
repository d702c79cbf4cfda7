"""Checkpoints of earlier versions, in today's layout.

State-dict layout by version: up to 0.1.0 the module held the whole open_clip model (``clip.visual.*``
for the image tower, ``clip.*`` for the text tower); since 0.2.0 the image tower is ``encoder.visual.*``
and the text tower is not saved (it is frozen and never used).
"""

from __future__ import annotations

_OLD_VISUAL, _NEW_VISUAL = "clip.visual.", "encoder.visual."


def upgrade_state_dict(state_dict: dict) -> dict:
    """A state dict in today's layout: ``clip.visual.*`` -> ``encoder.visual.*``, the text tower dropped."""
    if not any(key.startswith("clip.") for key in state_dict):
        return state_dict
    upgraded = {}
    for key, value in state_dict.items():
        if key.startswith(_OLD_VISUAL):
            upgraded[_NEW_VISUAL + key[len(_OLD_VISUAL):]] = value
        elif not key.startswith("clip."):  # the frozen text tower is never used: not kept
            upgraded[key] = value
    return upgraded
