"""Embedded demo model: a small CNN for scikit-learn's 8x8 handwritten digits.

Regenerate both files with ``tools/train_demo_model.py``.
"""

from pathlib import Path

MODEL_PATH = Path(__file__).with_name("digits_cnn.keras")
DATA_PATH = Path(__file__).with_name("digits_test.npz")
