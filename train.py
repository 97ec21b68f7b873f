#!/usr/bin/env python
"""``python train.py ...`` = ``frame-transformer-train ...`` = ``python -m frame_transformer.train ...`` (see -h)."""
import sys

from frame_transformer.train import main

if __name__ == "__main__":
    sys.exit(main())
