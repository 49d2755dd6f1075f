"""Every documented command starts: each script under scripts/ answers --help, run from a folder
outside the checkout (the project is installed, `-e .` in requirements.txt: no sys.path edits)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(f for f in os.listdir(os.path.join(REPO, "scripts")) if f.endswith((".py", ".sh")))


def test_the_list_of_scripts_is_the_folder():
    assert "bench_scale.py" in SCRIPTS and "gpu_check.sh" in SCRIPTS and len(SCRIPTS) >= 13


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_starts_with_help(script, tmp_path):
    path = os.path.join(REPO, "scripts", script)
    cmd = (["bash"] if script.endswith(".sh") else [sys.executable]) + [path, "--help"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout, out.stdout[-2000:]
    assert not os.listdir(tmp_path)  # --help wrote nothing
