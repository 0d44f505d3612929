"""MONAI Label app: atlas-based segmentation served by this repository's registration bundle.

The image an annotator selects is the *fixed* image; the atlas (an image, its label map and a label-name table) is
the *moving* one. The bundle registers the atlas onto the image (shipped 3D model + test-time refinement, run through
``bundle/configs/inference.yaml``) and the answer, ``pred``, is the atlas label map warped onto the image's own grid
(shape and affine of the image file), its structures numbered 1..N with ``label_names`` {name: value} (see
``Atlas.values`` for why not the atlas' own ids; the answer's ``atlas_label_ids`` maps names back to them).

    monailabel start_server --app monailabel_app --studies STUDIES \\
        --conf atlas_image ATLAS.nii.gz --conf atlas_label ATLAS_seg.nii.gz \\
        --conf atlas_label_names monailabel_app/freesurfer_aseg_labels.json

Other ``--conf`` keys: ``refine_preset`` (fast | default | accurate), ``refine_iterations`` (0 = the network alone),
``pixdim`` (mm of the registration grid; 2 is ~8x cheaper in 3D), ``bundle_root`` (default ``../bundle``).
See ``monailabel_app/README.md``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE_ROOT = APP_DIR.parent / "bundle"
MODEL_NAME = "atlas_registration"


def _bundle_scripts(bundle_root: Path) -> Any:
    """The bundle's ``scripts`` package (its configs' ``_target_`` need it importable, as ``monai.bundle run`` does)."""
    if str(bundle_root) not in sys.path:
        sys.path.insert(0, str(bundle_root))
    import scripts
    import scripts.datalist
    import scripts.writer

    return scripts


class Atlas(NamedTuple):
    """The moving side of every request.

    ``image``/``label``: NIfTI files on one grid (the label map holds integer ids, 0 = background);
    ``names``: atlas label id -> structure name, the structures returned (other ids of ``label`` come back as 0).
    (A NamedTuple: MONAI Label loads main.py without registering it in ``sys.modules``, which dataclasses need.)
    """

    image: str
    label: str
    names: dict[int, str]

    @property
    def values(self) -> dict[int, int]:
        """Atlas label id -> value in ``pred``: 1..N in id order. 3D Slicer's MONAI Label module imports label value
        ``k`` as the ``k``-th name of ``label_names`` sorted by value, so values must be consecutive from 1 (an
        aseg atlas' ids 2, 3, 4, 5, 7, ... would otherwise be shown under the wrong names)."""
        return {atlas_id: value for value, atlas_id in enumerate(sorted(self.names), start=1)}

    @property
    def labels(self) -> dict[str, int]:
        """``{name: value in pred}``: MONAI Label's ``labels`` / ``label_names``."""
        return {self.names[atlas_id]: value for atlas_id, value in self.values.items()}


def read_label_names(path: str, label_ids: list[int]) -> dict[int, str]:
    """Label id -> name from a JSON object ``{"2": "Left-Cerebral-White-Matter", ...}`` (keys: positive integer ids,
    values: unique non-empty names); without a file, every non-zero id of the atlas label map as ``label_<id>``."""
    if not path:
        return {i: f"label_{i}" for i in label_ids if i != 0}
    try:
        with open(path) as stream:
            table = json.load(stream)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"atlas_label_names: file not found: {path}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"atlas_label_names: {path} is not a JSON file: {error}") from error
    if not isinstance(table, dict) or not table:
        raise ValueError(
            f'atlas_label_names: {path} must hold a non-empty JSON object {{"1": "name", ...}}, '
            f"got {type(table).__name__}"
        )
    names: dict[int, str] = {}
    for key, name in table.items():
        if not str(key).isdigit() or int(key) == 0 or not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"atlas_label_names: {path}: entry {key!r}: {name!r} must map a positive integer id to a non-empty name"
            )
        names[int(key)] = name.strip()
    if len(set(names.values())) != len(names):
        duplicated = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
        raise ValueError(
            f"atlas_label_names: {path}: names must be unique (MONAI Label keys labels by name): {duplicated}"
        )
    return names


def load_atlas(conf: dict[str, str], scripts: Any) -> Atlas:
    """The atlas of the app's ``--conf``, every file checked at start-up (a bad atlas stops the server, named)."""
    image, label = conf.get("atlas_image"), conf.get("atlas_label")
    if not image or not label:
        raise ValueError(
            "the atlas is not configured: start the server with --conf atlas_image IMAGE.nii.gz "
            "--conf atlas_label LABELS.nii.gz [--conf atlas_label_names NAMES.json] (see monailabel_app/README.md)"
        )
    image, label = os.path.abspath(image), os.path.abspath(label)
    scripts.datalist.check_image_file(image, "--conf atlas_image")
    scripts.datalist.check_image_file(label, "--conf atlas_label")
    label_map = np.asarray(nib.load(label).dataobj)
    if not np.allclose(label_map, np.round(label_map)):
        raise ValueError(f"--conf atlas_label: {label} holds non-integer values: expected a label map")
    present = sorted(int(i) for i in np.unique(label_map))
    names = read_label_names(conf.get("atlas_label_names", ""), present)
    absent = sorted(set(names) - set(present))
    if absent:
        logger.warning("atlas_label_names: ids %s are not in the atlas label map %s: never returned", absent, label)
    unnamed = sorted(set(present) - set(names) - {0})
    if unnamed:
        logger.warning("atlas label ids %s of %s have no name in atlas_label_names: returned as 0", unnamed, label)
    return Atlas(image=image, label=label, names={i: n for i, n in sorted(names.items()) if i in present})


def _first(value: Any) -> Any:
    """MONAI Label clients show a list option as a choice and may send the whole list back: its first item."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


ITERATIONS_FORMAT = "an integer or a list like [40, 10]"


def _iterations(value: Any) -> int | list[int] | None:
    """``refine_iterations`` from a conf string, a request or a client: None (the preset's), an int or one per level."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"refine_iterations: expected {ITERATIONS_FORMAT}, got {value!r}") from error
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ValueError(f"refine_iterations: expected {ITERATIONS_FORMAT}, got {value!r}")
    if isinstance(value, list) and not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
        raise ValueError(f"refine_iterations: expected a list of integers, got {value!r}")
    return value


class AtlasRegistrationTask(BasicInferTask):
    """Atlas-based segmentation: register the atlas onto the requested image, return the warped atlas labels.

    A custom task because registration takes two images. MONAI Label's bundle task (``BundleInferTask``) and
    ``BasicInferTask``'s default inferer call ``network(image)`` on the one requested image and post-process its
    output into ``pred``; this bundle's network takes ``cat(moving, fixed)``, returns a displacement field, is refined
    per pair by optimisation (gradients, which the default inferer turns off) and its ``pred`` is a *second* input,
    the atlas label map, warped by that field and brought back onto the fixed file's grid. So ``run_inferer`` runs
    the bundle's own ``inference.yaml`` (same preprocessing, network, checkpoint, refinement, writer) with the
    request's image as ``fixed_image`` and the atlas as ``moving_image``/``moving_label``, and ``writer`` returns the
    ``warped_label.nii.gz`` that the bundle wrote (shape and affine of the image file). It is built on
    ``BasicInferTask`` rather than ``BundleInferTask`` also because ``monailabel.tasks.infer.bundle`` imports
    torchvision, which does not load beside this project's torch.

    Requests are served one at a time (a lock): a 3D registration at 1 mm peaks at ~1.4 GB.
    """

    def __init__(
        self,
        bundle_root: Path,
        atlas: Atlas,
        refine_preset: str = "default",
        refine_iterations: int | list[int] | None = None,
        pixdim: float | None = None,
    ) -> None:
        self.bundle_root = Path(bundle_root)
        self.scripts = _bundle_scripts(self.bundle_root)
        self.config_file = str(self.bundle_root / "configs" / "inference.yaml")
        parser = ConfigParser()
        parser.read_config(self.config_file)
        self.presets = list(parser["refine_presets"])
        self.atlas = atlas
        self.atlas_dims = self.scripts.datalist.spatial_dims_of_file(atlas.image, "--conf atlas_image")
        self.pixdim = pixdim
        self._check_preset(refine_preset)
        self._lock = threading.Lock()
        super().__init__(
            path=str(self.bundle_root / "models" / "model.pt"),
            network=None,
            type=InferType.SEGMENTATION,
            labels=atlas.labels,
            dimension=self.atlas_dims,
            description=(
                f"Atlas-based segmentation: registers the atlas {os.path.basename(atlas.image)} onto the image "
                "(deformable, diffeomorphic; network + test-time refinement) and returns its labels warped"
            ),
            config={
                "refine_preset": [refine_preset] + [p for p in self.presets if p != refine_preset],
                "refine_iterations": "" if refine_iterations is None else json.dumps(refine_iterations),
            },
        )

    def _check_preset(self, preset: str) -> None:
        if preset not in self.presets:
            raise ValueError(f"refine_preset: {preset!r} is not one of the bundle's presets {self.presets}")

    def is_valid(self) -> bool:
        return os.path.isfile(self.path[0])

    def pre_transforms(self, data: dict | None = None) -> list:
        return []  # the bundle's own preprocessing runs inside run_inferer, on both images

    def post_transforms(self, data: dict | None = None) -> list:
        return []

    def overrides(self, data: dict, output_dir: str, device: str) -> dict:
        """``inference.yaml`` ids set for one request: the pair, the output folder, device and refinement."""
        preset = str(_first(data.get("refine_preset")) or "default")
        self._check_preset(preset)
        values: dict[str, Any] = {
            "fixed_image": data["image"],
            "moving_image": self.atlas.image,
            "moving_label": self.atlas.label,
            "output_dir": output_dir,
            "device": torch.device(device),
            "refine_preset": preset,
        }
        iterations = _iterations(data.get("refine_iterations"))
        if iterations is not None:
            values["refine_iterations"] = iterations
        if self.pixdim is not None:
            values["pixdim"] = self.pixdim
        return values

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict[str, Any]:
        """Register the atlas onto ``data["image"]`` (a file path); ``data["pred"]``: a temporary NIfTI of the atlas
        labels on the image file's grid, ``data["registration"]``: the bundle's ``metrics.json``."""
        image = data.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"expected the image as a file path, got {type(image).__name__}")
        dims = self.scripts.datalist.spatial_dims_of_file(image, f"image {os.path.basename(image)}")
        if dims != self.atlas_dims:
            raise ValueError(f"image {image} is {dims}D but the atlas {self.atlas.image} is {self.atlas_dims}D")
        work = tempfile.mkdtemp(prefix="atlas-registration-")
        try:
            output_dir = os.path.join(work, "registration")
            parser = ConfigParser()
            parser.read_config(self.config_file)
            parser.update(self.overrides(data, output_dir, device))
            with self._lock:
                parser.get_parsed_content("inference")
            data["pred"] = self._named_labels(os.path.join(output_dir, "warped_label.nii.gz"))
            with open(os.path.join(output_dir, "metrics.json")) as stream:
                data["registration"] = json.load(stream)
        except Exception as error:
            specific = self.scripts._specific_error(error)  # the bundle's own message, not MONAI's config wrapper
            if specific is error:
                raise
            raise specific from error
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return data

    def _named_labels(self, warped_label: str) -> str:
        """The warped atlas labels as values 1..N (``Atlas.values``; unnamed ids 0), in a temporary file (the server
        removes it once sent)."""
        image = nib.load(warped_label)
        atlas_ids = np.asarray(image.dataobj).astype(np.int64)
        lookup = np.zeros(max(int(atlas_ids.max()), max(self.atlas.names)) + 1, dtype=np.int16)
        for atlas_id, value in self.atlas.values.items():
            lookup[atlas_id] = value
        labels = lookup[np.clip(atlas_ids, 0, None)]
        handle, path = tempfile.mkstemp(prefix="atlas-labels-", suffix=".nii.gz")
        os.close(handle)
        return self.scripts.writer.save_nifti_atomic(labels, image.affine, path)

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        """The label file and the result JSON (the bundle's timings and refinement report, the atlas files, and
        ``atlas_label_ids``: name -> the structure's id in the atlas label map)."""
        record = data.get("registration", {})
        return data["pred"], {
            "atlas": {"image": self.atlas.image, "label": self.atlas.label},
            "atlas_label_ids": {name: atlas_id for atlas_id, name in self.atlas.names.items()},
            "registration": {key: value for key, value in record.items() if key not in ("moving", "fixed")},
        }


class AtlasSegmentationApp(MONAILabelApp):
    """One infer task, ``atlas_registration``; errors come back as HTTP answers with the reason in ``detail``:
    404 unknown model or image id, 422 an image (or option) the registration cannot use, 500 anything else."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        bundle_root = Path(conf.get("bundle_root") or DEFAULT_BUNDLE_ROOT).resolve()
        if not (bundle_root / "configs" / "inference.yaml").is_file():
            raise FileNotFoundError(f"--conf bundle_root {bundle_root}: no configs/inference.yaml there")
        scripts = _bundle_scripts(bundle_root)
        atlas = load_atlas(conf, scripts)
        pixdim = conf.get("pixdim")
        self.task = AtlasRegistrationTask(
            bundle_root,
            atlas,
            refine_preset=conf.get("refine_preset", "default"),
            refine_iterations=_iterations(conf.get("refine_iterations")),
            pixdim=float(pixdim) if pixdim else None,
        )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Atlas-based segmentation (deformable registration bundle)",
            description="Warps an atlas' labels onto the selected image with the registration bundle",
            version="1.0",
            labels=self.task.labels,
        )

    def init_infers(self) -> dict[str, BasicInferTask]:
        return {MODEL_NAME: self.task}

    def init_strategies(self) -> dict:
        return {}  # no active learning: the app labels any image it is asked for

    def infer(self, request: dict, datastore: Any = None) -> dict:
        model, image = request.get("model"), request.get("image")
        if model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}: this server offers {sorted(self._infers)}")
        if isinstance(image, str) and not os.path.exists(image) and not self.datastore().get_image_uri(image):
            raise HTTPException(
                404, f"unknown image id {image!r}: not in the studies folder {self.studies} (GET /datastore/ lists ids)"
            )
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except (ValueError, FileNotFoundError, MemoryError) as error:
            logger.exception("atlas registration of %s failed", image)
            raise HTTPException(422, f"image {image!r}: {type(error).__name__}: {error}") from error
        except MONAILabelException as error:
            raise HTTPException(500, f"{error.error.value}: {error.msg}") from error
        except Exception as error:
            logger.exception("atlas registration of %s failed", image)
            raise HTTPException(500, f"registration of {image!r} failed: {type(error).__name__}: {error}") from error
