"""Evaluation of trunk-muscle segmentations against sparse ground truth (readers contour a few axial slices).

Grand Challenge evaluation method (`python -m evaluation`, no arguments) and local tool
(`python -m evaluation --predictions DIR --ground-truth DIR --output DIR`). See evaluation/README.md.
"""

__version__ = "1.0.0"
