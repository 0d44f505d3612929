"""The unlabelled training pair (``oasis3d_train``: ``subject_x``, ``subject_y``) and the shipped 3D model, for the
refinement studies (``refine_gradient.py``, ``refine_schedule.py``): settings are chosen here, never on a test pair."""

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


def inference_config(fixed_image: Path) -> ConfigParser:
    """``inference.yaml`` as the bundle parses it for a 3D pair."""
    config = ConfigParser()
    config.read_config(str(REPO / "bundle" / "configs" / "inference.yaml"))
    config["bundle_root"] = str(REPO / "bundle")
    config["fixed_image"] = str(fixed_image)
    return config


def shipped_network(config: ConfigParser) -> torch.nn.Module:
    """The shipped 3D model (``ckpt_path``), in eval mode."""
    network = config.get_parsed_content("network_def")
    network.load_state_dict(torch.load(config.get_parsed_content("ckpt_path"), weights_only=True))
    return network.eval()


def load_pair(parser: ConfigParser, fixed: Path, moving: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images through inference.yaml's own preprocessing, as ``(1, 1, *spatial)`` float tensors."""
    preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
    images = [preprocessing({"image": str(path)})["image"] for path in (fixed, moving)]
    return tuple(torch.as_tensor(image).as_subclass(torch.Tensor)[None].float() for image in images)
