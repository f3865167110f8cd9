"""Calibration: data-driven choices of quantization schemes (scales, ranges, bit allocation)."""
