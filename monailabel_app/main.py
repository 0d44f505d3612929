"""MONAI Label app: atlas-based segmentation served by this repository's registration bundle.

The image an annotator selects is the *fixed* image; the atlas (an image, its label map and a label-name table) is
the *moving* one. The bundle registers the atlas onto the image (shipped 3D model + test-time refinement, run through
``bundle/configs/inference.yaml``) and the answer, ``pred``, is the atlas label map warped onto the image's own grid
(shape and affine of the image file), its structures numbered 1..N with ``label_names`` {name: value} (see
``Atlas.values`` for why not the atlas' own ids; the answer's ``atlas_label_ids`` maps names back to them).

    monailabel start_server --app monailabel_app --studies STUDIES --host 127.0.0.1 \\
        --conf atlas_image ATLAS.nii.gz --conf atlas_label ATLAS_seg.nii.gz \\
        --conf atlas_label_names monailabel_app/freesurfer_aseg_labels.json

Other ``--conf`` keys: ``refine_preset`` (fast | default | accurate), ``refine_iterations`` (0 = the network alone),
``pixdim`` (mm of the registration grid; 2 is ~8x cheaper in 3D), ``bundle_root`` (default ``../bundle``), and the
request limits ``max_refine_iterations``, ``max_request_seconds``, ``max_queued_requests``.

Made to serve annotators on a shared network: a request names an image of the studies folder by its id (nothing
else is read: no server path, no symlink out of the folder), its options are checked against an allow-list, it runs
in a child process off the server's event loop (one at a time, a small queue, stopped at its time limit), uploads
are checked before they enter the folder, and no answer names a server path. See ``monailabel_app/README.md``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.routing import APIRoute
from filelock import FileLock
from monai.bundle import ConfigParser
from monailabel.config import settings
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE_ROOT = APP_DIR.parent / "bundle"
MODEL_NAME = "atlas_registration"


def _load_sibling(name: str) -> Any:
    """A module of this folder, by file path: MONAI Label loads main.py itself that way, not as a package."""
    module_name = f"monailabel_app_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, APP_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


registration = _load_sibling("registration_worker")


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


# ---- what leaves the server: ids and file names, never its paths ----

UNKNOWN_IMAGE = (
    "unknown image id: not an image of this server's studies folder (GET /datastore/?output=all lists the ids; "
    "upload new images with PUT /datastore/?image=ID)"
)
# An absolute path: "/" not preceded by a word character, "." ":" or "/" (so "2D/3D", "a.b/c" and URLs stay), then
# its components; group 1 is the last one, the file name.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"`,;:()\[\]{}<>]+/)*([^\s/'\"`,;:()\[\]{}<>]*)")


def public_text(text: str, studies_root: str) -> str:
    """``text`` as a client may see it: files of the studies folder by their name relative to it, any other
    absolute path by its file name. Error messages of the bundle name files by their full path, which tells a
    client what exists where on the server."""
    text = text.replace(studies_root.rstrip(os.sep) + os.sep, "")
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "<server path>", text)


def public_json(value: Any, studies_root: str) -> Any:
    """``public_text`` on every string (and key) of a JSON value."""
    if isinstance(value, str):
        return public_text(value, studies_root)
    if isinstance(value, dict):
        return {public_json(k, studies_root): public_json(v, studies_root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_json(v, studies_root) for v in value]
    return value


def _inside(path: str, folder: str) -> bool:
    """Whether ``path``, symlinks resolved, lies inside ``folder`` (already resolved)."""
    real = os.path.realpath(path)
    return real != folder and os.path.commonpath([real, folder]) == folder


# ---- per-request options: an allow-list with types and ranges ----

REQUEST_OPTIONS = ("refine_preset", "refine_iterations")
ITERATIONS_FORMAT = "an integer or a list like [40, 10]"


def _first(value: Any) -> Any:
    """MONAI Label clients show a list option as a choice and may send the whole list back: its first item."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _iterations(value: Any) -> int | list[int] | None:
    """``refine_iterations`` from a conf string, a request or a client: None (the preset's), an int or one per level.
    Types only; ``AtlasRegistrationTask.checked_iterations`` checks the ranges."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"refine_iterations: expected {ITERATIONS_FORMAT}, got {value[:40]!r}") from error
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ValueError(f"refine_iterations: expected {ITERATIONS_FORMAT}, got {type(value).__name__}")
    if isinstance(value, list) and not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
        raise ValueError(f"refine_iterations: expected a list of integers, got {str(value)[:60]}")
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

    The registration itself runs in a child process (``registration_worker.py``): one at a time (a 3D registration
    at 1 mm peaks at ~1.4 GB), ``max_waiting`` more requests queued, and stopped at the request's deadline.
    """

    def __init__(
        self,
        bundle_root: Path,
        atlas: Atlas,
        refine_preset: str = "default",
        refine_iterations: int | list[int] | None = None,
        pixdim: float | None = None,
        max_iterations: int | None = None,
        max_waiting: int = 2,
    ) -> None:
        self.bundle_root = Path(bundle_root)
        self.scripts = _bundle_scripts(self.bundle_root)
        self.config_file = str(self.bundle_root / "configs" / "inference.yaml")
        self.atlas = atlas
        self.atlas_dims = self.scripts.datalist.spatial_dims_of_file(atlas.image, "--conf atlas_image")
        self.levels = self._levels_per_preset()
        self.presets = list(self.levels)
        self.max_iterations = self.default_max_iterations() if max_iterations is None else int(max_iterations)
        self.pixdim = pixdim
        if refine_preset not in self.presets:
            raise ValueError(
                f"--conf refine_preset: {refine_preset!r} is not one of the bundle's presets: {self.presets}"
            )
        self.default_preset = refine_preset
        self.default_iterations = self.checked_iterations(refine_iterations, refine_preset, "--conf refine_iterations")
        self.worker = registration.RegistrationWorker(str(self.bundle_root), max_waiting=max_waiting)
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

    def _levels_per_preset(self) -> dict[str, list[int]]:
        """Preset name -> its refinement levels for the atlas' dimension, as ``inference.yaml`` computes them."""
        parser = ConfigParser()
        parser.read_config(self.config_file)
        levels = {}
        for preset in parser["refine_presets"]:
            parser.update({"refine_preset": preset, "spatial_dims": self.atlas_dims})
            levels[preset] = [int(n) for n in parser.get_parsed_content("refine_levels", lazy=False)]
        return levels

    def default_max_iterations(self) -> int:
        """Three times the largest per-level count of the ``accurate`` preset (of all presets if there is none):
        room to refine further than the bundle's slowest preset, not hours of work."""
        parser = ConfigParser()
        parser.read_config(self.config_file)
        presets = parser["refine_presets"]
        chosen = [presets["accurate"]] if "accurate" in presets else list(presets.values())
        return 3 * max(int(n) for preset in chosen for n in preset["iterations"])

    def allowed_options(self) -> str:
        """The allow-list in words, for every refused option."""
        levels = ", ".join(f"{name}: {len(levels)}" for name, levels in self.levels.items())
        return (
            f"allowed per-request options: refine_preset: one of {self.presets}; refine_iterations: empty (the "
            f"server's default), 0 (the network alone), an integer 0..{self.max_iterations} (every level) or a list of "
            f"one integer 0..{self.max_iterations} per level of the preset (levels per preset: {levels}); "
            "nothing else (the server's --conf sets the rest)"
        )

    def checked_iterations(self, value: Any, preset: str, what: str = "refine_iterations") -> int | list[int] | None:
        """``value`` as ``_iterations`` reads it, each count in 0..max_iterations, a list with one per level."""
        iterations = _iterations(value)
        counts = iterations if isinstance(iterations, list) else [] if iterations is None else [iterations]
        if any(n < 0 or n > self.max_iterations for n in counts):
            raise ValueError(
                f"{what}: iterations per level must lie in 0..{self.max_iterations} (this server's "
                f"--conf max_refine_iterations), got {str(iterations)[:60]}"
            )
        if isinstance(iterations, list) and len(iterations) != len(self.levels[preset]):
            raise ValueError(
                f"{what}: {len(iterations)} counts for the {len(self.levels[preset])} levels of refine_preset "
                f"{preset!r} ({self.levels[preset]})"
            )
        return iterations

    def request_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The request's options checked against the allow-list (names, types, ranges), the server's defaults
        filled in; a 422 naming what is allowed otherwise. Unknown options are refused, not ignored: a client that
        asks for ``pixdim`` must not believe it was applied."""
        unknown = sorted(str(key)[:40] for key in options if key not in REQUEST_OPTIONS)
        try:
            if unknown:
                raise ValueError(f"unsupported option(s) {unknown[:10]}")
            preset = _first(options.get("refine_preset"))
            if preset is None or preset == "":
                preset = self.default_preset
            if not isinstance(preset, str) or preset not in self.presets:
                raise ValueError(f"refine_preset: {str(preset)[:40]!r} is not one of {self.presets}")
            iterations = self.checked_iterations(options.get("refine_iterations"), preset)
        except ValueError as error:
            raise HTTPException(422, f"{error}; {self.allowed_options()}") from error
        default = self.default_iterations
        if iterations is None and not (isinstance(default, list) and len(default) != len(self.levels[preset])):
            iterations = default  # the server's (a list of counts only for presets with as many levels)
        return {"refine_preset": preset, "refine_iterations": iterations}

    def is_valid(self) -> bool:
        return os.path.isfile(self.path[0])

    def pre_transforms(self, data: dict | None = None) -> list:
        return []  # the bundle's own preprocessing runs inside run_inferer, on both images

    def post_transforms(self, data: dict | None = None) -> list:
        return []

    def overrides(self, data: dict, output_dir: str, device: str) -> dict:
        """``inference.yaml`` ids set for one request: the pair, the output folder, device and refinement (the
        options as ``request_options`` checked them)."""
        values: dict[str, Any] = {
            "fixed_image": data["image"],
            "moving_image": self.atlas.image,
            "moving_label": self.atlas.label,
            "output_dir": output_dir,
            "device": str(device),
            "refine_preset": data["refine_preset"],
        }
        if data.get("refine_iterations") is not None:
            values["refine_iterations"] = data["refine_iterations"]
        if self.pixdim is not None:
            values["pixdim"] = self.pixdim
        return values

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict[str, Any]:
        """Register the atlas onto ``data["image"]`` (a file of the studies folder) by ``data["deadline"]``;
        ``data["pred"]``: a temporary NIfTI of the atlas labels on the image file's grid, ``data["registration"]``:
        the bundle's ``metrics.json``."""
        image = data.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"expected the image as a file path, got {type(image).__name__}")
        name = os.path.basename(image)
        dims = self.scripts.datalist.spatial_dims_of_file(image, f"image {name}")
        if dims != self.atlas_dims:
            raise ValueError(
                f"image {name} is {dims}D but the atlas {os.path.basename(self.atlas.image)} is {self.atlas_dims}D"
            )
        work = tempfile.mkdtemp(prefix="atlas-registration-")
        try:
            output_dir = os.path.join(work, "registration")
            self.worker.run(self.config_file, self.overrides(data, output_dir, str(device)), data["deadline"])
            data["pred"] = self._named_labels(os.path.join(output_dir, "warped_label.nii.gz"))
            with open(os.path.join(output_dir, "metrics.json")) as stream:
                data["registration"] = json.load(stream)
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
        """The label file and the result JSON (the bundle's timings and refinement report, the atlas' file names,
        and ``atlas_label_ids``: name -> the structure's id in the atlas label map)."""
        record = data.get("registration", {})
        return data["pred"], {
            "atlas": {"image": os.path.basename(self.atlas.image), "label": os.path.basename(self.atlas.label)},
            "atlas_label_ids": {name: atlas_id for atlas_id, name in self.atlas.names.items()},
            "registration": {key: value for key, value in record.items() if key not in ("moving", "fixed")},
        }


# ---- the studies folder: uploads checked before they enter it, answers without server paths ----

# An image id or label tag is a file name without folders: no "/", no "..", no hidden file.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
UPLOAD_EXTENSIONS = (".nii.gz", ".nii")


def _refuse_name(what: str, name: Any) -> HTTPException:
    return HTTPException(
        422, f"{what} {str(name)[:40]!r}: expected a plain name (letters, digits, '.', '_', '-'; no folders)"
    )


class StudiesDatastore(LocalDatastore):
    """MONAI Label's local datastore of the studies folder, made safe to serve.

    - An upload (``PUT /datastore/``) is checked (``check_image``: a readable, complete NIfTI of the atlas'
      dimension) before it enters the folder, under a plain id, and placed atomically (a hidden temporary file in the
      folder, then a rename): a refused or interrupted upload leaves nothing behind, and the folder's watcher never
      sees half a file. Submitted labels are placed the same way, under a plain tag.
    - An image or label whose file resolves outside the folder (a symlink out of it) has no URI: it is neither
      registered, downloaded nor removed (MONAI Label would remove the file the link leads to).
    - Answers name files relative to the folder (``get_image_info``'s ``path``, ``datalist``), never by their
      server path.

    Written against monailabel 0.8.5's ``LocalDatastore`` (``_datastore``, ``_lock_file``, the models); the
    version is pinned in ``requirements-monailabel.txt``.
    """

    def __init__(self, studies: str, check_image: Callable[[str, str], None], **kwargs: Any) -> None:
        super().__init__(studies, **kwargs)
        self.root = os.path.realpath(studies)
        self._check_image = check_image

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        return uri if uri and _inside(uri, self.root) else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        uri = super().get_label_uri(label_id, label_tag)
        return uri if uri and _inside(uri, self.root) else ""

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        info = super().get_image_info(image_id)
        if "path" in info:
            info["path"] = os.path.relpath(info["path"], self.root) if _inside(info["path"], self.root) else ""
        return info

    def remove_image(self, image_id: str) -> None:
        """MONAI Label removes the file an image's name resolves to: through a symlink, a file outside the folder.
        Such an image is unknown here, as for ``/infer/``."""
        entry = self._datastore.objects.get(image_id)
        if entry and not _inside(os.path.join(self.root, image_id + entry.image.ext), self.root):
            raise HTTPException(404, UNKNOWN_IMAGE)
        super().remove_image(image_id)

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Image/label pairs by their names relative to the folder, whatever ``full_path`` asks: this is what
        ``GET /datastore/?output=train`` answers, and the app trains nothing that would need the paths."""
        return [
            {key: os.path.relpath(path, self.root) for key, path in pair.items()}
            for pair in super().datalist(full_path=True)
        ]

    def _place(self, source: str, destination: str) -> None:
        """Copy ``source`` to ``destination`` atomically, through a hidden file beside it that no extension
        pattern of the folder's watcher matches."""
        handle, staged = tempfile.mkstemp(dir=os.path.dirname(destination), prefix=".upload-", suffix=".partial")
        os.close(handle)
        try:
            shutil.copyfile(source, staged)
            os.replace(staged, destination)
        finally:
            if os.path.exists(staged):
                os.remove(staged)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        default_id, extension = self._to_id(os.path.basename(image_filename))
        image_id = image_id or default_id
        if not isinstance(image_id, str) or not PLAIN_NAME.fullmatch(image_id):
            raise _refuse_name("image id", image_id)
        if extension not in UPLOAD_EXTENSIONS:
            raise HTTPException(422, f"upload {image_id}: expected a NIfTI file ({' or '.join(UPLOAD_EXTENSIONS)})")
        name = image_id + extension
        try:
            self._check_image(image_filename, f"upload {name}")
        except (ValueError, TypeError, FileNotFoundError, MemoryError) as error:
            message = public_text(str(error).replace(image_filename, name), self.root)
            raise HTTPException(422, f"{message} (refused: nothing was added to the studies folder)") from error
        with FileLock(self._lock_file):
            self._place(image_filename, os.path.join(self.root, name))
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=extension))
            self._update_datastore_file(lock=False)
        logger.info("upload %s added to the studies folder", name)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if not isinstance(label_tag, str) or not PLAIN_NAME.fullmatch(label_tag):
            raise _refuse_name("label tag", label_tag)
        entry = self._datastore.objects.get(image_id)
        if not entry:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, extension = self._to_id(os.path.basename(label_filename))
        folder = self._datastore.label_path(label_tag)
        name = image_id + extension
        with FileLock(self._lock_file):
            os.makedirs(folder, exist_ok=True)
            self._place(label_filename, os.path.join(folder, name))
            info = dict(label_info or {}, ts=int(time.time()), name=name)
            entry.labels[label_tag] = DataModel(info=info, ext=extension)
            self._update_datastore_file(lock=False)
        return image_id


# ---- POST /infer/{model} off the event loop ----

INFER_PATH = f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}"


def infer_endpoint(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: ResultType | None = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
) -> Any:
    """``POST /infer/{model}`` as MONAI Label's, as a plain ``def``: FastAPI runs it in its thread pool, so the
    event loop (``/info/``, ``/datastore/``, every other request) goes on answering while a registration runs.
    MONAI Label 0.8.5's is an ``async def`` that calls the task in the loop: one registration held the whole server.

    Only images of the studies folder, by id: files sent with the request and sessions (kept outside the folder)
    are refused. ``params`` must be a JSON object of the allowed options (it would otherwise replace the URL's
    ``image``: MONAI Label merges it into the request)."""
    if file is not None or label is not None or session_id:
        raise HTTPException(
            422,
            "this server registers images of its studies folder only, by id: upload the image with "
            "PUT /datastore/?image=ID first (files and sessions sent with /infer are refused)",
        )
    try:
        options = json.loads(params) if params else {}
    except json.JSONDecodeError as error:
        raise HTTPException(422, f"params: not JSON ({error.msg} at character {error.pos})") from error
    if not isinstance(options, dict):
        raise HTTPException(422, f"params: expected a JSON object {{...}}, got {type(options).__name__}")
    instance = _serving_app()
    if model in instance._infers:
        instance.task.request_options(options)  # refuses "image", "model" and every other key not allowed
    return run_inference(background_tasks, model, image, "", params, None, None, output)


infer_endpoint.atlas_app = True  # marks the replacement, whichever copy of this module installed it


def _serving_app() -> AtlasSegmentationApp:
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _replace_post_route(router: APIRouter, path: str) -> bool:
    """Put ``infer_endpoint`` in place of ``router``'s ``POST path`` route; whether the router had one. Through
    ``add_api_route``, which tells FastAPI that the router changed."""
    for index, route in enumerate(router.routes):
        if isinstance(route, APIRoute) and route.path == path and "POST" in route.methods:
            if not getattr(route.endpoint, "atlas_app", False):
                router.routes.pop(index)
                router.add_api_route(
                    path[len(router.prefix) :], infer_endpoint, methods=["POST"], summary=route.summary, tags=route.tags
                )
            return True
    return False


def serve_infer_off_the_event_loop() -> None:
    """Serve ``POST /infer/{model}`` with ``infer_endpoint`` instead of MONAI Label's.

    The app is created in the server's start-up (its lifespan), before the first request is served. FastAPI
    0.165 (pinned) reads an included router's routes live, so the route is replaced in MONAI Label's infer router;
    older FastAPI copied the routes into the app's router at ``include_router``, so a copy there is replaced too.
    Without a server (the command-line tools: ``monailabel.app`` not imported) only the router is changed."""
    from monailabel.endpoints import infer as infer_module

    replaced = _replace_post_route(infer_module.router, f"{infer_module.router.prefix}/{{model}}")
    server = sys.modules.get("monailabel.app")
    if server is not None and hasattr(server, "app"):
        replaced = _replace_post_route(server.app.router, INFER_PATH) or replaced
    if not replaced:
        raise RuntimeError(
            f"MONAI Label's POST {INFER_PATH} route was not found: this app is written for monailabel 0.8.5 "
            "(requirements-monailabel.txt)"
        )
    logger.info("POST %s is served off the event loop", INFER_PATH)


def _conf_number(conf: dict[str, str], key: str, default: int | None, minimum: int) -> int | None:
    """An integer ``--conf`` value >= ``minimum`` (``default`` when absent); a clear error naming the key."""
    value = conf.get(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f"--conf {key}: expected an integer >= {minimum}, got {value!r}")
    return number


class AtlasSegmentationApp(MONAILabelApp):
    """One infer task, ``atlas_registration``; errors come back as HTTP answers with the reason in ``detail``:
    404 unknown model or image id (one answer for every id that is not an image of the studies folder), 422 an
    image or option the registration cannot use, 503 busy, 504 past the time limit, 500 anything else."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        if studies.startswith(("http://", "https://")):
            raise ValueError("--studies: this app serves a local folder of NIfTI images, not a remote datastore")
        serve_infer_off_the_event_loop()
        bundle_root = Path(conf.get("bundle_root") or DEFAULT_BUNDLE_ROOT).resolve()
        if not (bundle_root / "configs" / "inference.yaml").is_file():
            raise FileNotFoundError(f"--conf bundle_root {bundle_root}: no configs/inference.yaml there")
        scripts = _bundle_scripts(bundle_root)
        atlas = load_atlas(conf, scripts)
        pixdim = conf.get("pixdim")
        self.studies_root = os.path.realpath(studies)
        self.max_request_seconds = _conf_number(conf, "max_request_seconds", 300, 1)
        self.task = AtlasRegistrationTask(
            bundle_root,
            atlas,
            refine_preset=conf.get("refine_preset", "default"),
            refine_iterations=_iterations(conf.get("refine_iterations")),
            pixdim=float(pixdim) if pixdim else None,
            max_iterations=_conf_number(conf, "max_refine_iterations", None, 0),
            max_waiting=_conf_number(conf, "max_queued_requests", 2, 0),
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

    def init_datastore(self) -> StudiesDatastore:
        return StudiesDatastore(
            self.studies,
            self._check_upload,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _check_upload(self, path: str, what: str) -> None:
        """An upload the registration can use: a complete NIfTI (every byte read) of the atlas' dimension."""
        self.task.scripts.datalist.check_image_file(path, what)
        dims = self.task.scripts.datalist.spatial_dims_of_file(path, what)
        if dims != self.task.atlas_dims:
            raise ValueError(f"{what} is a {dims}D image; this server registers {self.task.atlas_dims}D images")

    def init_infers(self) -> dict[str, BasicInferTask]:
        return {MODEL_NAME: self.task}

    def init_strategies(self) -> dict:
        return {}  # no active learning: the app labels any image it is asked for

    def batch_infer(self, request: dict, datastore: Any = None) -> dict:
        raise HTTPException(404, "batch inference is off on this server: request images one at a time")

    def infer_wsi(self, request: dict, datastore: Any = None) -> dict:
        raise HTTPException(404, "whole-slide inference is not offered by this server")

    def study_image(self, image_id: Any) -> str:
        """The file of an image id of the studies folder, symlinks resolved, checked to lie inside the folder;
        nothing is opened. Everything else gets one answer, ``UNKNOWN_IMAGE`` (whether it exists on the server or
        not: the answer must not tell)."""
        if not isinstance(image_id, str) or not PLAIN_NAME.fullmatch(image_id):
            raise HTTPException(404, UNKNOWN_IMAGE)
        uri = self.datastore().get_image_uri(image_id)
        if not uri or not _inside(uri, self.studies_root) or not os.path.isfile(uri):
            raise HTTPException(404, UNKNOWN_IMAGE)
        return os.path.realpath(uri)

    def infer(self, request: dict, datastore: Any = None) -> dict:
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"unknown model {str(model)[:40]!r}: this server offers {sorted(self._infers)}")
        deadline = time.monotonic() + self.max_request_seconds
        image = self.study_image(request.get("image"))
        name = os.path.relpath(image, self.studies_root)
        options = self.task.request_options({k: v for k, v in request.items() if k not in ("model", "image")})
        try:
            result = super().infer({"model": model, "image": image, "deadline": deadline, **options}, datastore)
        except HTTPException:
            raise
        except registration.RegistrationBusy as error:
            raise HTTPException(
                503, f"busy: {error}; please try again in a minute", headers={"Retry-After": "60"}
            ) from error
        except registration.RegistrationTimeout as error:
            raise HTTPException(
                504,
                f"image {name!r}: the registration took longer than this server's limit of "
                f"{self.max_request_seconds} s (--conf max_request_seconds) and was stopped; a lighter setting "
                "answers sooner (refine_preset fast, or refine_iterations 0)",
            ) from error
        except registration.RegistrationFailed as error:
            status = 422 if error.input_error else 500
            message = public_text(error.message, self.studies_root)
            raise HTTPException(status, f"image {name!r}: {error.type_name}: {message}") from error
        except registration.INPUT_ERRORS as error:
            logger.exception("atlas registration of %s failed", name)
            message = public_text(str(error), self.studies_root)
            raise HTTPException(422, f"image {name!r}: {type(error).__name__}: {message}") from error
        except MONAILabelException as error:
            raise HTTPException(500, public_text(f"{error.error.value}: {error.msg}", self.studies_root)) from error
        except Exception as error:
            logger.exception("atlas registration of %s failed", name)
            message = public_text(str(error), self.studies_root)
            raise HTTPException(500, f"registration of {name!r} failed: {type(error).__name__}: {message}") from error
        result["params"] = public_json(result.get("params", {}), self.studies_root)
        return result
