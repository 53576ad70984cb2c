"""Datasets for the reference training recipes."""
from fastkd.data.digit_canvases import CanvasConfig, DigitCanvases, generate_canvases, source_splits

__all__ = ["CanvasConfig", "DigitCanvases", "generate_canvases", "source_splits"]
