# Mitogen's name for arbor_get_stack.
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from arbor_get_stack import ActionModule  # noqa: F401
finally:
    sys.path.pop(0)
