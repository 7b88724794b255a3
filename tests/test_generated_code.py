"""The checked-in protobuf code is what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_generated_code_matches_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
