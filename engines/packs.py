"""Where model packs live, and the table of product-line profiles: one home for both.

A profile is a product line the agent can serve (configs/<profile>.toml). Its shipped model pack,
if the repository ships one, is ``engines/models/<profile>/`` (model.json, the ONNX models,
calibration.json, MODEL_CARD.md). Everything that needs a default pack folder or the list of
profiles asks here.
"""
from __future__ import annotations

from pathlib import Path

SHIPPED_PACKS = Path(__file__).resolve().parent / "models"

# Profiles that have a trained, shipped model pack (engines/models/<profile>/). wafer, chip and parts
# are trained and evaluated on generated data (training/lines.py: their real data is not reachable).
PROFILES: tuple[str, ...] = ("steel", "magnetic_tile", "kolektorsdd", "wafer", "chip", "parts")
GENERATED_PROFILES: tuple[str, ...] = ("wafer", "chip", "parts")


def shipped_pack_dir(profile: str) -> Path:
    """The folder of a profile's shipped model pack (it may not exist for a profile without one)."""
    if not profile or "/" in profile or profile.startswith("."):
        raise ValueError(f"not a profile name: {profile!r}")
    return SHIPPED_PACKS / profile


def shipped_profiles() -> tuple[str, ...]:
    """Profiles whose pack is present in this installation (model.json exists)."""
    return tuple(p for p in PROFILES if (SHIPPED_PACKS / p / "model.json").is_file())
