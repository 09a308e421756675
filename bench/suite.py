"""The standard suite: the zoo benchmark (``bench/zoo.py``) on its four reference models,
ResNet50, MobileNetV2, EfficientNetB0 (batches 1 and 128) and the BERT-base sized encoder of
Keras layers (sequence 128, batch 32). Same options and record as the zoo.

Run on the GPU machine:
    source .whl/activate.sh && python bench/suite.py --out $OUT/suite.json [--quick] [--resume]
"""

from __future__ import annotations

import sys

from zoo import main

SUITE = ("ResNet50", "MobileNetV2", "EfficientNetB0", "BERT-base encoder")

if __name__ == "__main__":
    sys.exit(main(default_models=SUITE))
