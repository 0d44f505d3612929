"""Shared test helpers: the bundle's scripts on sys.path, the real-data location, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
SHARED_DATA = Path(os.environ.get("REGISTRATION_SHARED_DATA", REPO.parent / "shared" / "data"))

sys.path.insert(0, str(BUNDLE))

requires_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "oasis3d").is_dir(),
    reason=f"real OASIS data not found at {SHARED_DATA} (put shared/ beside the repo, or set REGISTRATION_SHARED_DATA)",
)


def bundle_command(run_id: str, config_files: list[str], overrides: dict) -> tuple[list[str], dict]:
    """The command line and environment of ``python -m monai.bundle run <run_id>`` as a user would type it."""
    config = config_files[0] if len(config_files) == 1 else "[" + ",".join(f"'{c}'" for c in config_files) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return command, env


def run_bundle(
    run_id: str, config_files: list[str], overrides: dict, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run <run_id>`` exactly as a user would; return the finished process."""
    command, env = bundle_command(run_id, config_files, overrides)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def check_ok(process: subprocess.CompletedProcess) -> str:
    """Fail with the run's last output when it did not exit 0; return stdout + stderr."""
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A checkpoint of the 2D network inference.yaml builds (untrained: only loading and the data path matter)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    parser.update({"spatial_dims": 2})
    folder = tmp_path_factory.mktemp("models2d")
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "model.pt")
    return folder
