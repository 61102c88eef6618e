"""Benchmark: the full-size SDXL UNet planned with the command line's defaults, its ``flops``
split and the paper's hand split, each split's measured balance side by side
(``benchmarks/partition_full.py`` says what is measured and how).

    python benchmarks/partition_sdxl.py [--ns 2 3 4] [--stage-repeats 5] [--busy]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.partition_full import main  # noqa: E402

if __name__ == "__main__":
    main("sdxl")
