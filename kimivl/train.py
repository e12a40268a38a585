"""``python -m kimivl.train CONFIG.yaml [key=value ...]``: one fine-tuning run (same as ``kimivl train``)."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from kimivl.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
