"""The bundle as the Model Zoo sees it: metadata, config consistency, the network contract, export."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import BUNDLE, CONFIGS, REPO
from monai.bundle import ConfigParser

SCHEMA = REPO.parent / "shared" / "schema" / "meta_schema_20240725.json"


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_inference_config_builds_the_same_network_and_preprocessing_as_training():
    train, inference = _yaml("train.yaml"), _yaml("inference.yaml")
    for key in ("backbones", "network_def", "preprocessing", "pixdim", "backbone_name", "integration_steps"):
        assert inference[key] == train[key], f"inference.yaml '{key}' differs from train.yaml"


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("backbone_name", ["voxelmorph", "localnet"])
def test_network_def_maps_two_channel_input_to_ddf(spatial_dims, backbone_name):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    parser.update({"spatial_dims": spatial_dims, "backbone_name": backbone_name})
    network = parser.get_parsed_content("network_def")
    expected = "VoxelMorphUNet" if backbone_name == "voxelmorph" else "LocalNet"
    assert type(network.backbone).__name__ == expected
    shape = (40, 36) if spatial_dims == 2 else (24, 20, 28)  # not multiples of the divisor: padded, cropped back
    with torch.no_grad():
        ddf = network(torch.rand((1, 2) + shape))
    assert ddf.shape == (1, spatial_dims) + shape


def _cli(*args: str) -> subprocess.CompletedProcess:
    # Model Zoo tools run from the bundle folder, where `scripts` is importable.
    command = [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not SCHEMA.is_file(), reason=f"Model Zoo schema not found at {SCHEMA}")
def test_metadata_validates_against_the_model_zoo_schema(tmp_path):
    schema = tmp_path / "schema.json"  # verify_metadata may write next to the schema: never point it at shared/
    shutil.copy(SCHEMA, schema)
    result = _cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema))
    assert result.returncode == 0 and "verified with no error" in result.stdout + result.stderr, result.stderr[-3000:]


def test_verify_net_in_out_and_traced_export(tmp_path):
    result = _cli(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.yaml",
        "--device",
        "cpu",
    )
    assert result.returncode == 0 and "verified with no error" in result.stdout + result.stderr, result.stderr[-3000:]

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    network = parser.get_parsed_content("network_def")
    checkpoint = tmp_path / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    exported = tmp_path / "model.ts"
    result = _cli(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(exported),
        "--ckpt_file",
        str(checkpoint),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.yaml",
        "--use_trace",
        "True",
        "--input_shape",
        "[1,2,64,64]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    x = torch.rand(1, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(exported))(x), network(x))


@pytest.mark.parametrize("subjects, expected", [(3, 1.0), (101, 0.0)])
def test_large_cohorts_stream_instead_of_caching_everything(tmp_path, subjects, expected):
    import json

    import nibabel as nib
    import numpy as np

    image = nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 1), dtype=np.float32), np.eye(4))
    entries = []
    for index in range(subjects):
        nib.save(image, tmp_path / f"s{index}.nii.gz")
        entries.append({"image": f"s{index}.nii.gz"})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"datalist": str(tmp_path / "datalist.json")})
    assert parser.get_parsed_content("cache_rate") == expected
