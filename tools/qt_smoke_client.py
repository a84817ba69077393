#!/usr/bin/env python3
"""Layer 2: the PyQt6 QWebSocket smoke client (same code as `collab-trio smoke`).

    python tools/qt_smoke_client.py ws://127.0.0.1:8765 [--duration 15] [--interval 5] [--echo]

The client lives in the package (collab_trio.qt_smoke) so that the command
and this script can never drift apart; this file only makes it runnable from
a checkout that was not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import collab_trio  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

try:
    from collab_trio.qt_smoke import main
except ImportError as exc:
    sys.exit(f"the Qt smoke client needs PyQt6 (pip install 'collab-trio[qt]'): {exc}")

if __name__ == "__main__":
    sys.exit(main(prog="qt_smoke_client.py"))
