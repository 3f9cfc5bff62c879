"""Run the kolora CLI with levers from levers.py applied first.

    python bench/experiments/patched_kolora.py fused-head-ce,pad64 -- train --config configs/gemma3-270m.yaml …
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import levers  # noqa: E402


def main() -> int:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    cut = sys.argv.index("--")
    levers.apply(",".join(sys.argv[1:cut]))
    from kolora.cli import main as kolora_main

    return kolora_main(sys.argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
