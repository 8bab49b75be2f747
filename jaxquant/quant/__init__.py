"""Quantized weight types and the one dense/conv dispatch point."""
