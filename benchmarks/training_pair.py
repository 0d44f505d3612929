"""The unlabelled training pair (``oasis3d_train``: ``subject_x``, ``subject_y``) and the shipped models as
``inference.yaml`` builds them, for the studies that choose inference settings (``refine_gradient.py``,
``refine_schedule.py``, ``network_passes.py``, ``cpu_kernels.py``): settings are chosen here, never on a test pair."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from monai.bundle import ConfigParser  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "oasis3d_train"
DIRECTIONS = (("y", "x"), ("x", "y"))  # (moving, fixed)


def training_images(data: Path | str) -> dict[str, Path]:
    """``{"x": path, "y": path}``; exits with the missing files named."""
    images = {name: Path(data) / f"subject_{name}_image.nii.gz" for name in ("x", "y")}
    missing = [str(path) for path in images.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"training images not found: {', '.join(missing)}")
    return images


def inference_config(fixed_image: Path | None = None, **overrides) -> ConfigParser:
    """``inference.yaml`` as the bundle parses it for a pair whose fixed image is ``fixed_image`` (its dimensionality
    follows the file), or with ``overrides`` such as ``spatial_dims=3`` and no file."""
    config = ConfigParser()
    config.read_config(str(REPO / "bundle" / "configs" / "inference.yaml"))
    config["bundle_root"] = str(REPO / "bundle")
    if fixed_image is not None:
        config["fixed_image"] = str(fixed_image)
    for key, value in overrides.items():
        config[key] = value
    return config


def shipped_network(config: ConfigParser) -> torch.nn.Module:
    """The shipped model of the config's dimensionality (``ckpt_path``), in eval mode."""
    network = config.get_parsed_content("network_def")
    network.load_state_dict(torch.load(config.get_parsed_content("ckpt_path"), weights_only=True))
    return network.eval()


def preprocessed(preprocessing, path: Path) -> torch.Tensor:
    """One image through inference.yaml's own preprocessing, as a ``(1, 1, *spatial)`` float tensor."""
    image = preprocessing({"image": str(path)})["image"]
    return torch.as_tensor(image).as_subclass(torch.Tensor)[None].float()


def network_starts(data: Path | str) -> tuple[ConfigParser, torch.nn.Module, dict[str, tuple[torch.Tensor, ...]]]:
    """``(config, network, {"y -> x": (velocity, moving, fixed), "x -> y": ...})``: the shipped network's velocity
    (the refinement's start) and the preprocessed images of both directions of the training pair."""
    images = training_images(data)
    config = inference_config(images["x"])
    network = shipped_network(config)
    preprocessing = config.get_parsed_content("preprocessing", instantiate=True)
    loaded = {name: preprocessed(preprocessing, path) for name, path in images.items()}  # each image read once
    starts = {}
    for moving_name, fixed_name in DIRECTIONS:
        fixed, moving = loaded[fixed_name], loaded[moving_name]
        with torch.no_grad():
            velocity = network.velocity(torch.cat([moving, fixed], dim=1))
        starts[f"{moving_name} -> {fixed_name}"] = (velocity, moving, fixed)
    return config, network, starts


def refiner_settings(config: ConfigParser, keys: tuple[str, ...]) -> dict:
    """The ``refiner`` arguments ``keys`` as ``inference.yaml`` sets them for a 3D pair."""
    return {key: config.get_parsed_content(f"refiner#{key}") for key in keys}
