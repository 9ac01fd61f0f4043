"""Coilsight engines: models, training, export, inference backends and engine builds.

Importing this package is cheap: torch, onnx and tensorrt are imported only by the
modules that need them (train, export, build, backends.tensorrt).
"""
