"""
The code standards CI enforces: ruff (lint and format) and mypy strict with the
mypy-zope plugin, over the package, the tests and the benchmarks.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


class LintTests(SynchronousTestCase):
    def test_ruff(self) -> None:
        result = run("ruff", "check", "src", "tests", "bench")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_ruffFormat(self) -> None:
        result = run("ruff", "format", "--check", "src", "tests", "bench")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_mypy(self) -> None:
        result = run("mypy", "src", "tests")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_noPluginPackageInit(self) -> None:
        """
        C{twisted/plugins} must never be a package of ours: an C{__init__.py}
        there would hide every other project's Twisted plugins.
        """
        for name in ("src/twisted/__init__.py", "src/twisted/plugins/__init__.py"):
            self.assertFalse(os.path.exists(os.path.join(ROOT, name)), name)
