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

SHIPPED_MODEL = BUNDLE / "models" / "model.pt"
SCHEMA = REPO.parent / "shared" / "schema" / "meta_schema_20240725.json"


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_inference_config_builds_the_same_network_and_preprocessing_as_training():
    train, inference = _yaml("train.yaml"), _yaml("inference.yaml")
    for key in ("backbones", "network_def", "preprocessing", "backbone_name"):
        assert inference[key] == train[key], f"inference.yaml '{key}' differs from train.yaml"


def _parsed(config_files: list[str], overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in config_files])
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("spatial_dims, training_configs", [(2, ["train.yaml"]), (3, ["train.yaml", "brain3d.yaml"])])
def test_inference_runs_the_network_its_model_was_trained_as(spatial_dims, training_configs):
    """2D: the default training's network; 3D: the shipped brain model's (brain3d.yaml), on 1 mm images."""
    inference = _parsed(["inference.yaml"], {"spatial_dims": spatial_dims})
    training = _parsed(training_configs, {"spatial_dims": spatial_dims})
    inferred, trained = inference.get_parsed_content("network_def"), training.get_parsed_content("network_def")
    shapes = {name: tuple(value.shape) for name, value in trained.state_dict().items()}
    assert {name: tuple(value.shape) for name, value in inferred.state_dict().items()} == shapes
    assert inferred.integration_steps == trained.integration_steps
    # the velocity grid has the training voxel size: inference pixdim x downsample == training pixdim x downsample
    inference_grid = inference.get_parsed_content("pixdim") * inferred.downsample
    assert inference_grid == training.get_parsed_content("pixdim") * trained.downsample


@pytest.mark.parametrize("spatial_dims, differentiated", [(2, None), (3, 2)])
def test_inference_refiner_differentiates_the_last_squarings_in_3d_only(spatial_dims, differentiated):
    """3D refinement differentiates the last 2 of the network's squarings (benchmarks/refine_gradient.py), 2D all."""
    refiner = _parsed(["inference.yaml"], {"spatial_dims": spatial_dims}).get_parsed_content("refiner")
    assert refiner.differentiated_squarings == differentiated
    assert refiner.enabled and refiner.integration_steps == (5 if spatial_dims == 3 else 7)


ENGINES = {"train.yaml": ["train#trainer", "validate#evaluator"], "inference.yaml": ["infer#evaluator"]}


@pytest.mark.parametrize("config, engines", list(ENGINES.items()))
def test_amp_given_on_the_command_line_is_read_as_a_flag(config, engines):
    """``--amp false`` arrives as the string "false", which ignite's autocast refuses deep in the first iteration (a
    TypeError) and a plain bool() would read as True: every engine takes the parsed flag."""
    for given, expected in (("false", False), ("true", True), (False, False), ("0", False)):
        assert _parsed([config], {"amp": given}).get_parsed_content("amp_flag") is expected, given
    parser = _parsed([config], {})
    assert all(parser[f"{engine}#amp"] == "@amp_flag" for engine in engines)
    with pytest.raises(Exception) as raised:
        _parsed([config], {"amp": "maybe"}).get_parsed_content("amp_flag")
    error, messages = raised.value, []
    while error is not None:  # MONAI wraps the component's error: the user's last line is the innermost one
        messages, error = messages + [str(error)], error.__cause__
    assert "--amp expects true or false, got 'maybe'" in messages[-1]


@pytest.mark.parametrize("training_configs", [["train.yaml"], ["train.yaml", "brain3d.yaml"]])
def test_training_augmentation_never_gives_both_images_the_same_noise(training_configs):
    """A random dictionary transform draws once for all its keys: one noise/bias transform over both images would
    add the same pattern to both, which lines up only at the identity and teaches the network not to move."""
    augmentation = _parsed(training_configs, {"spatial_dims": 3}).get_parsed_content("train#augmentation")
    augmentation.set_random_state(seed=0)
    shape = (1, 12, 12, 12)
    identical_changes = 0
    for _ in range(40):
        pair = augmentation({"moving_image": torch.zeros(shape), "fixed_image": torch.zeros(shape)})
        moving, fixed = torch.as_tensor(pair["moving_image"]), torch.as_tensor(pair["fixed_image"])
        identical_changes += int(bool(moving.abs().sum() > 0) and torch.equal(moving, fixed))
    assert identical_changes == 0, (
        f"{identical_changes} of 40 pairs got the same random intensity pattern on both sides"
    )


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


def test_shipped_model_is_under_the_model_zoo_size_limit_and_loads():
    assert SHIPPED_MODEL.is_file(), f"the shipped 3D brain model is missing: {SHIPPED_MODEL}"
    assert SHIPPED_MODEL.stat().st_size < 25 * 1024 * 1024
    network = _parsed(["inference.yaml"], {}).get_parsed_content("network_def")
    network.load_state_dict(torch.load(SHIPPED_MODEL, weights_only=True))
    assert network.spatial_dims == 3 and network.downsample == 2


def test_verify_net_in_out_and_traced_export(tmp_path):
    """Model Zoo checks on the shipped 3D model: network_data_format in/out, TorchScript export (traced)."""
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
    network.load_state_dict(torch.load(SHIPPED_MODEL, weights_only=True))  # the shipped weights, strictly
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
        "[1,2,64,64,64]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    x = torch.rand(1, 2, 64, 64, 64)
    # The trace records PyTorch's own conv3d (device-neutral); the live network routes its few-channel CPU layers to
    # oneDNN (scripts.conv_backend, rounding-level differences, checked in test_deformation.py). With oneDNN off both
    # run the same kernels, so the export must match the network exactly as before.
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
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
