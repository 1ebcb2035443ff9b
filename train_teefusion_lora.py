#!/usr/bin/env python
"""Kept for one release: the command line is now `python -m cfg_distill train teefusion ...` (same flags)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cfg_distill.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", "teefusion", *sys.argv[1:]]))
