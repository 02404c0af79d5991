"""Synthetic BIDS-ASL subjects with ground truth (``asl-simulate``) and pair-noise statistics of real or
simulated series (``asl-noise-stats``): the training and benchmark data of the ASL bundle.

It reads and writes through the bundle's own BIDS-ASL reader and atomic writer (``asl_enhance``).
"""
