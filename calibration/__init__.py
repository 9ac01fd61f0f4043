"""Calibration: thresholds tied to model hashes, Dice, spatial px -> mm, reports."""
