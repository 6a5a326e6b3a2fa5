"""The JavaScript client's own checks (``node --test examples/js/``): SSE parsing, typed errors,
request headers against a fake fetch, and shardstate.ts / shardstate.mjs kept in step."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "js"


@pytest.mark.timeout(120)
def test_node_test_of_the_js_client_passes() -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is missing (the CI set-up installs nodejs)")
        pytest.skip("node is not installed")
    done = subprocess.run(
        [node, "--test", str(EXAMPLES / "shardstate.test.mjs")], capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"\bpass 7\b", done.stdout), done.stdout[-2000:]  # TAP or spec reporter
    assert re.search(r"\bfail 0\b", done.stdout), done.stdout[-2000:]
