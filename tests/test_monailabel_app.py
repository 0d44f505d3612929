"""The MONAI Label app (monailabel_app/) through a real server: ``monailabel start_server`` as a subprocess.

Studies folder: the real OASIS subject_a image and a corrupt file; atlas: subject_b's image, labels and the FreeSurfer
name table. The request registers at the network-alone setting (``refine_iterations 0``, ~10 s a request on 2 CPU
cores) to keep this file near a minute; the default (network + refinement) is measured by
``benchmarks/monailabel_request.py`` and quoted in monailabel_app/README.md. Helpers (start/stop, parsing, Dice) are
the benchmark's, so the figure in the docs and the check here come from the same code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, requires_shared_data

spec = importlib.util.spec_from_file_location("monailabel_request", REPO / "benchmarks" / "monailabel_request.py")
client = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = client
spec.loader.exec_module(client)

DATA = SHARED_DATA / "oasis3d"
IMAGE_ID = "subject_a_image"
CORRUPT_ID = "corrupt_image"
THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))

requires_monailabel = pytest.mark.skipif(
    importlib.util.find_spec("monailabel") is None,
    reason="monailabel is not installed: pip install --no-deps -r requirements-monailabel.txt",
)
pytestmark = requires_monailabel  # the tests that use the server also need ../shared/data (skipped without)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A running server for this module's tests, stopped (process group killed) when they end, whatever happens."""
    if requires_shared_data.args[0]:
        pytest.skip(requires_shared_data.kwargs["reason"])
    work = tmp_path_factory.mktemp("monailabel")
    studies = work / "studies"
    studies.mkdir()
    shutil.copy(DATA / "subject_a_image.nii.gz", studies)
    # a gzip cut in the middle: the datastore lists it like any image; registering it must fail with a clear answer
    (studies / f"{CORRUPT_ID}.nii.gz").write_bytes((DATA / "subject_a_image.nii.gz").read_bytes()[:200_000])
    log = work / "server.log"
    conf = client.atlas_conf(DATA, refine_iterations="0")
    with client.running_server(studies, conf, log, threads=THREADS) as base:
        yield SimpleNamespace(base=base, log=log)


def _detail(body: bytes) -> str:
    return json.loads(body)["detail"]


def _assert_still_answering(server: SimpleNamespace) -> None:
    status, _, _ = client.request(f"{server.base}/info/", timeout=60)
    assert status == 200, f"/info/ answered {status} after a bad request:\n{client._log_tail(server.log)}"


def _expected_labels() -> tuple[dict[str, int], dict[str, int]]:
    """``({name: value in pred}, {name: atlas id})``: the table's structures present in the atlas, values 1..N."""
    present = set(np.unique(np.asarray(nib.load(DATA / "subject_b_label.nii.gz").dataobj)).tolist())
    table = {int(i): name for i, name in json.loads(client.LABEL_NAMES.read_text()).items() if int(i) in present}
    ordered = sorted(table)
    return {table[i]: value for value, i in enumerate(ordered, start=1)}, {table[i]: i for i in ordered}


def test_info_lists_the_atlas_model_with_the_atlas_label_names(server):
    status, _, body = client.request(f"{server.base}/info/")
    assert status == 200
    model = json.loads(body)["models"].get(client.MODEL)
    assert model is not None, f"/info/ lists no {client.MODEL}: {json.loads(body)['models']}"
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == _expected_labels()[0]


def test_infer_returns_the_registered_atlas_labels_on_the_image_grid(server):
    status, content_type, body, seconds = client.infer(server.base, IMAGE_ID)
    assert status == 200, f"{status}: {body[:2000]!r}\n{client._log_tail(server.log)}"
    params, label = client.parse_infer_answer(content_type, body)
    fixed = nib.load(DATA / "subject_a_image.nii.gz")
    assert label.shape == fixed.shape
    np.testing.assert_allclose(label.affine, fixed.affine, atol=1e-5)
    values, atlas_ids = _expected_labels()
    assert params["label_names"] == values and params["atlas_label_ids"] == atlas_ids
    pred = np.asarray(label.dataobj)
    assert set(np.unique(pred).tolist()) <= {0, *values.values()}
    warped = client.to_atlas_ids(params, pred)
    reference = np.asarray(nib.load(DATA / "subject_a_label.nii.gz").dataobj)
    atlas = np.asarray(nib.load(DATA / "subject_b_label.nii.gz").dataobj)
    ids = client.eval_label_ids(DATA)
    unregistered, registered = client.mean_dice(reference, atlas, ids), client.mean_dice(reference, warped, ids)
    print(f"mean Dice over {len(ids)} structures: unregistered {unregistered:.3f}, via MONAI Label {registered:.3f}")
    print(f"{seconds:.1f} s per request (server registration {params['registration']['seconds']:.1f} s)")
    assert registered > unregistered
    assert params["registration"]["folding_fraction"] < 0.01


@pytest.mark.parametrize(
    "model, image_id, status, named",
    [
        (client.MODEL, "no_such_image", 404, "no_such_image"),
        ("no_such_model", IMAGE_ID, 404, client.MODEL),
        (client.MODEL, CORRUPT_ID, 422, f"{CORRUPT_ID}.nii.gz"),
    ],
    ids=["unknown-image", "unknown-model", "corrupt-file"],
)
def test_malformed_requests_get_clear_answers_and_the_server_keeps_answering(server, model, image_id, status, named):
    answer, _, body, _ = client.infer(server.base, image_id, model=model)
    assert answer == status, f"{answer}: {body[:2000]!r}"
    assert named in _detail(body), _detail(body)
    _assert_still_answering(server)


def test_two_concurrent_requests_both_get_label_maps(server):
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda _: client.infer(server.base, IMAGE_ID), range(2)))
    shape = nib.load(DATA / "subject_a_image.nii.gz").shape
    for status, content_type, body, _ in answers:
        assert status == 200, f"{status}: {body[:2000]!r}"
        assert client.parse_infer_answer(content_type, body)[1].shape == shape
    _assert_still_answering(server)


def test_a_server_without_an_atlas_fails_at_start_naming_the_conf_keys(tmp_path: Path):
    with pytest.raises(RuntimeError, match="atlas_image"):
        with client.running_server(tmp_path, {}, tmp_path / "server.log", threads=THREADS, timeout=120):
            pass


@pytest.fixture(scope="module")
def app_module():
    """monailabel_app/main.py loaded as MONAI Label loads it (by file path, not as a package)."""
    module_spec = importlib.util.spec_from_file_location("monailabel_app_main", REPO / "monailabel_app" / "main.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "is not a JSON file"),
        ("[1, 2]", "must hold a non-empty JSON object"),
        ('{"x": "Hippocampus"}', "positive integer id"),
        ('{"0": "Background"}', "positive integer id"),
        ('{"3": ""}', "positive integer id"),
        ('{"3": "Cortex", "42": "Cortex"}', "names must be unique"),
    ],
    ids=["not-json", "not-an-object", "non-integer-id", "zero-id", "empty-name", "duplicate-name"],
)
def test_a_bad_label_name_table_is_refused_naming_the_file(app_module, tmp_path, content, message):
    path = tmp_path / "names.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        app_module.read_label_names(str(path), [0, 3, 42])
    assert str(path) in str(error.value)


def test_without_a_table_every_atlas_id_gets_a_name_and_values_run_from_one(app_module):
    names = app_module.read_label_names("", [0, 2, 3, 41])
    assert names == {2: "label_2", 3: "label_3", 41: "label_41"}
    atlas = app_module.Atlas(image="a.nii.gz", label="a_seg.nii.gz", names={41: "R", 2: "L", 3: "C"})
    assert atlas.values == {2: 1, 3: 2, 41: 3}
    assert atlas.labels == {"L": 1, "C": 2, "R": 3}
