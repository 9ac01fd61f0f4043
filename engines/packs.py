"""Where model packs live, and the table of product-line profiles: one home for both.

A profile is a product line the agent can serve (configs/<profile>.toml). Its shipped model pack,
if the repository ships one, is ``engines/models/<profile>/`` (model.json, the ONNX models,
calibration.json, MODEL_CARD.md): the ``edge`` tier, the CPU default. The ``line`` tier (larger
models for GPU line boxes, docs/models.md "Tiers") lives in ``engines/models/line/<profile>/`` where
one is shipped. Everything that needs a default pack folder or the list of profiles asks here.
"""
from __future__ import annotations

from pathlib import Path

SHIPPED_PACKS = Path(__file__).resolve().parent / "models"

# Profiles that have a trained, shipped model pack (engines/models/<profile>/). wafer, chip and parts
# are trained and evaluated on generated data (training/lines.py: their real data is not reachable).
PROFILES: tuple[str, ...] = ("steel", "magnetic_tile", "kolektorsdd", "wafer", "chip", "parts")
GENERATED_PROFILES: tuple[str, ...] = ("wafer", "chip", "parts")


# Model tiers (the config's models.tier): edge = the CPU default, line = accuracy first, for GPU line boxes
TIERS: tuple[str, ...] = ("edge", "line")
DEFAULT_TIER = "edge"
LINE_TIER_DIR = "line"  # engines/models/line/<profile>/


def shipped_pack_dir(profile: str, tier: str = DEFAULT_TIER) -> Path:
    """The folder of a profile's shipped model pack of ``tier`` (it may not exist: not every tier of
    every profile is shipped)."""
    if not profile or "/" in profile or profile.startswith(".") or profile == LINE_TIER_DIR:
        raise ValueError(f"not a profile name: {profile!r}")
    if tier not in TIERS:
        raise ValueError(f"unknown model tier {tier!r}; known: {', '.join(TIERS)}")
    return SHIPPED_PACKS / profile if tier == "edge" else SHIPPED_PACKS / LINE_TIER_DIR / profile


def tier_of_model_size(model_size: str | None) -> str | None:
    """The tier an instance model size belongs to (training.nets INSTANCE_CONFIGS: edge, edge_sep -> edge;
    line* -> line), None for another size (test nets, component models)."""
    size = model_size or ""
    return next((t for t in TIERS if size == t or size.startswith(t + "_")), None)


def training_command(profile: str, tier: str) -> str:
    """How a tier's pack is made (docs/models.md, "Tiers"): train, export (a line pack keeps the edge pack's
    gate), calibrate."""
    out = f"engines/models/{profile}" if tier == "edge" else f"engines/models/{LINE_TIER_DIR}/{profile}"
    return (f"coilsight train-instances --profile {profile} --data-root $COILSIGHT_DATA_ROOT --out runs/{profile}-{tier} "
            f"--model-size {tier} --threads 1 --max-minutes 100, then coilsight export --checkpoint runs/{profile}-{tier} "
            f"--profile {profile} --out {out}" + (f" --gate-from engines/models/{profile}" if tier != "edge" else "")
            + ", then coilsight calibrate thresholds "
            f"--profile {profile} --data-root $COILSIGHT_DATA_ROOT --models {out}")


def missing_tier_pack(profile: str, tier: str) -> str | None:
    """None when the shipped pack of (profile, tier) is present (its model.json exists), else why not and
    how to make it: the message a config error shows."""
    folder = shipped_pack_dir(profile, tier)
    if (folder / "model.json").is_file():
        return None
    return (f"the {tier} tier's model pack for profile {profile!r} is not shipped: no model.json in {folder}. "
            f"Make it as docs/models.md (\"Tiers\") says: {training_command(profile, tier)}; "
            f"or set models.dir to a pack folder")


def shipped_profiles() -> tuple[str, ...]:
    """Profiles whose pack is present in this installation (model.json exists)."""
    return tuple(p for p in PROFILES if (SHIPPED_PACKS / p / "model.json").is_file())
