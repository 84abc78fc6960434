"""The stock recipe's side of `benchmarks/compare.py`: `python stock_arm.py PATH/TO/run_clip.py [its options]`.

Runs transformers' example script `examples/pytorch/contrastive-image-text/run_clip.py` as its own `__main__`,
unchanged. The example was written for transformers 4: it imports `send_example_telemetry` (a usage ping to the Hub,
removed in transformers 5), which is given here as a function that does nothing when the installed transformers
lacks it; nothing else is touched.
"""

from __future__ import annotations

import runpy
import sys

import transformers.utils

if not hasattr(transformers.utils, "send_example_telemetry"):
    # Telemetry only: the benchmark runs offline and sends nothing.
    transformers.utils.send_example_telemetry = lambda *args, **kwargs: None

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
