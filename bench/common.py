"""What the benchmarks share: printing their figures and saving them as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def emit(results: dict[str, Any], out: Optional[Path]) -> None:
    """Print the figures as JSON and, with ``--out``, write them there too."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
