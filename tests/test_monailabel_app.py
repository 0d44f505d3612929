"""The MONAI Label app (monailabel_app/) through a real server: ``monailabel start_server`` as a subprocess.

Studies folder: the real OASIS subject_a image, a corrupt file and a symlink to an image outside the folder; atlas:
subject_b's image, labels and the FreeSurfer name table. The request registers at the network-alone setting
(``refine_iterations 0``) to keep this file short; the default (network + refinement) is measured by
``benchmarks/monailabel_request.py`` and quoted in monailabel_app/README.md. Helpers (start/stop, parsing, Dice) are
the benchmark's, so the figure in the docs and the check here come from the same code.

Safety on a shared network (issue 32): only ids of the studies folder are registered (one answer for every other
id, whatever exists on the server), options are allow-listed with ranges, registrations run off the event loop
(``/info/`` answers meanwhile) with a queue and a time limit, uploads are checked, and no answer names a server path.
Refused requests are answered before any registration, so they cost milliseconds; the file runs four registrations
to the end, and two more that a second server (``max_request_seconds 3``) stops: about 2.5 min on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
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
LINK_ID = "linked_outside"  # a symlink in the studies folder to an image outside it
MAX_ITERATIONS = 50  # the server's --conf max_refine_iterations
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
    studies, outside = work / "studies", work / "outside"
    studies.mkdir()
    outside.mkdir()
    shutil.copy(DATA / "subject_a_image.nii.gz", studies)
    # a gzip cut in the middle: the datastore lists it like any image; registering it must fail with a clear answer
    (studies / f"{CORRUPT_ID}.nii.gz").write_bytes((DATA / "subject_a_image.nii.gz").read_bytes()[:200_000])
    outside_image = outside / "outside_image.nii.gz"
    shutil.copy(DATA / "subject_a_image.nii.gz", outside_image)
    (studies / f"{LINK_ID}.nii.gz").symlink_to(outside_image)
    log = work / "server.log"
    conf = client.atlas_conf(DATA, refine_iterations="0", max_refine_iterations=str(MAX_ITERATIONS))
    with client.running_server(studies, conf, log, threads=THREADS) as base:
        yield SimpleNamespace(base=base, log=log, work=work, studies=studies, outside_image=outside_image)


def _send(
    url: str,
    method: str = "POST",
    fields: dict[str, str] | None = None,
    files: dict[str, tuple[str, bytes]] | None = None,
    timeout: float = 600,
) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers, body)`` of a ``multipart/form-data`` request (how clients send ``params`` and files)."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in (fields or {}).items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, (filename, data) in (files or {}).items():
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _infer(base: str, image_id: str, params: str | None = None, timeout: float = 600) -> tuple[int, dict, bytes]:
    """``POST /infer/atlas_registration?image=<id, quoted>`` with ``params`` (a JSON text) as the form field."""
    url = f"{base}/infer/{client.MODEL}?image={urllib.parse.quote(image_id, safe='')}"
    return _send(url, fields=None if params is None else {"params": params}, timeout=timeout)


@pytest.fixture(scope="module")
def first_answer(server) -> tuple[str, bytes]:
    """``(content type, body)`` of one good request, shared by the tests that look at a registration's answer."""
    status, content_type, body, seconds = client.infer(server.base, IMAGE_ID)
    assert status == 200, f"{status}: {body[:2000]!r}\n{client._log_tail(server.log)}"
    print(f"{seconds:.1f} s per request")
    return content_type, body


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


def test_infer_returns_the_registered_atlas_labels_on_the_image_grid(server, first_answer):
    content_type, body = first_answer
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
    print(f"server registration {params['registration']['seconds']:.1f} s")
    assert registered > unregistered
    assert params["registration"]["folding_fraction"] < 0.01


@pytest.mark.parametrize(
    "model, image_id, status, named",
    [
        (client.MODEL, "no_such_image", 404, "unknown image id"),
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


def _unknown_id_answer(server: SimpleNamespace) -> tuple[int, bytes]:
    status, _, body = _infer(server.base, "no_such_image", timeout=60)
    return status, body


@pytest.mark.parametrize(
    "image_id",
    ["outside", "/etc/passwd", "../../../../etc/hostname", LINK_ID],
    ids=["absolute-path-of-a-nifti-outside", "etc-passwd", "parent-folders", "symlink-out-of-the-studies"],
)
def test_anything_but_an_image_of_the_studies_gets_the_unknown_id_answer(server, image_id):
    """Whether the file exists on the server, is a NIfTI, or is reached through a symlink inside the studies
    folder: the same 404, naming no path, and nothing is read (a 200 here means the server read a file outside)."""
    if image_id == "outside":
        image_id = str(server.outside_image)
    if image_id == LINK_ID:  # the datastore lists the link: the refusal is the check of where it leads
        _, _, listing = client.request(f"{server.base}/datastore/?output=all")
        assert LINK_ID in json.loads(listing)["objects"]
        assert client.request(f"{server.base}/datastore/image?image={LINK_ID}")[0] == 404  # nor downloaded
    status, _, body = _infer(server.base, image_id, timeout=60)
    assert (status, body) == _unknown_id_answer(server), body[:2000]
    assert status == 404 and "etc" not in _detail(body) and str(server.work) not in _detail(body)
    _assert_still_answering(server)


def test_removing_a_symlink_out_of_the_studies_leaves_its_target(server):
    status, _, body = client.request(f"{server.base}/datastore/image?id={LINK_ID}", method="DELETE", timeout=60)
    assert status == 404, body[:2000]
    assert server.outside_image.is_file() and (server.studies / f"{LINK_ID}.nii.gz").is_symlink()


@pytest.mark.parametrize(
    "params",
    [
        {"refine_iterations": 1000000},
        {"refine_iterations": "1000000"},
        {"refine_iterations": [1000000, 10]},
        {"refine_iterations": -1},
    ],
    ids=["huge", "huge-as-text", "huge-in-a-list", "negative"],
)
def test_refine_iterations_out_of_range_are_refused_with_the_allowed_range(server, params):
    status, _, body = _infer(server.base, IMAGE_ID, json.dumps(params), timeout=60)
    assert status == 422, body[:2000]
    detail = _detail(body)
    assert f"0..{MAX_ITERATIONS}" in detail and "max_refine_iterations" in detail, detail
    _assert_still_answering(server)


@pytest.mark.parametrize(
    "params, named",
    [
        ({"pixdim": 0.05}, "pixdim"),
        ({"image": "/etc/passwd"}, "image"),  # params are merged into the request: it would replace the URL's image
        ({"refine_preset": "slowest"}, "slowest"),
    ],
    ids=["pixdim", "image-in-params", "unknown-preset"],
)
def test_an_unknown_option_is_refused_naming_the_allowed_ones(server, params, named):
    status, _, body = _infer(server.base, IMAGE_ID, json.dumps(params), timeout=60)
    assert status == 422, body[:2000]
    detail = _detail(body)
    assert named in detail and "refine_preset" in detail and "refine_iterations" in detail, detail
    assert "/etc" not in detail


def _flat_nifti() -> bytes:
    return nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)).to_bytes()


def _folder_state(folder: Path) -> set[str]:
    """Every entry below ``folder``, hidden ones too, but MONAI Label's own bookkeeping (rewritten on any change)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.name not in ("datastore_v2.json", ".lock")}


@pytest.mark.parametrize(
    "image_id, content",
    [
        ("upload_truncated", lambda: (DATA / "subject_a_image.nii.gz").read_bytes()[:300_000]),
        ("upload_flat", _flat_nifti),
        ("upload_not_nifti", lambda: b"not an image at all"),
        ("../upload_escape", lambda: (DATA / "subject_a_image.nii.gz").read_bytes()),
    ],
    ids=["truncated-gzip", "2d-image", "not-nifti", "id-with-folders"],
)
def test_an_upload_the_registration_cannot_use_is_refused_and_leaves_nothing(server, image_id, content):
    before = _folder_state(server.studies)
    status, _, body = _send(
        f"{server.base}/datastore/?image={urllib.parse.quote(image_id, safe='')}",
        method="PUT",
        files={"file": ("upload.nii.gz", content())},
        timeout=60,
    )
    assert status == 422, body[:2000]
    assert str(server.work) not in _detail(body) and tempfile.gettempdir() + os.sep not in _detail(body)
    assert _folder_state(server.studies) == before
    assert not (server.work / "upload_escape.nii.gz").exists()
    _, _, listing = client.request(f"{server.base}/datastore/?output=all")
    assert os.path.basename(image_id) not in json.loads(listing)["objects"]
    # the same upload of a good image enters the folder, whole, under its id
    status, _, body = _send(
        f"{server.base}/datastore/?image=upload_good",
        method="PUT",
        files={"file": ("upload.nii.gz", (DATA / "subject_a_image.nii.gz").read_bytes())},
        timeout=60,
    )
    assert status == 200, body[:2000]
    assert (server.studies / "upload_good.nii.gz").read_bytes() == (DATA / "subject_a_image.nii.gz").read_bytes()
    assert not [p for p in server.studies.iterdir() if p.name.startswith(".upload-")]


def test_no_answer_names_a_server_path(server, first_answer):
    """Paths stay on the server: neither the atlas files, the studies folder, the repository, nor temporary files
    appear in any answer, good or refused."""
    answers = [first_answer[1]]
    for url in (
        "/info/",
        "/datastore/?output=all",
        "/datastore/?output=train",
        f"/datastore/image/info?image={IMAGE_ID}",
    ):
        answers.append(client.request(f"{server.base}{url}")[2])
    for image_id, params in [
        (CORRUPT_ID, None),
        ("no_such_image", None),
        ("/etc/passwd", None),
        (str(server.outside_image), None),
        (IMAGE_ID, '{"pixdim": 2}'),
        (IMAGE_ID, '{"refine_iterations": [1, 2, 3, 4, 5]}'),
        (IMAGE_ID, "not json"),
    ]:
        answers.append(_infer(server.base, image_id, params, timeout=60)[2])
    answers.append(
        _send(f"{server.base}/datastore/?image=flat", method="PUT", files={"file": ("f.nii.gz", _flat_nifti())})[2]
    )
    roots = {str(server.work), os.path.realpath(server.work), str(REPO), str(SHARED_DATA), str(DATA)}
    roots |= {os.path.realpath(r) for r in roots} | {tempfile.gettempdir() + os.sep, os.path.expanduser("~") + os.sep}
    for body in answers:
        text = body.decode(errors="replace")
        leaked = sorted(root for root in roots if root in text)
        assert not leaked, f"{leaked} in {text[:3000]}"


def _malformed_params(rng: random.Random) -> str:
    """One malformed ``params`` text: wrong types, out-of-range counts, unknown or server-only keys, not JSON."""
    word = "".join(rng.choice("abcdefghij_/.") for _ in range(rng.randint(1, 12)))
    choices = [
        lambda: json.dumps({word: rng.random()}),
        lambda: json.dumps({"refine_iterations": rng.randint(MAX_ITERATIONS + 1, 10**9)}),
        lambda: json.dumps({"refine_iterations": -rng.randint(1, 10**6)}),
        lambda: json.dumps({"refine_iterations": rng.random() * 50}),
        lambda: json.dumps({"refine_iterations": word}),
        lambda: json.dumps({"refine_iterations": [rng.randint(0, 5)] * rng.choice([3, 4, 7])}),
        lambda: json.dumps({"refine_iterations": [word, word]}),
        lambda: json.dumps({"refine_iterations": {"levels": [1]}}),
        lambda: json.dumps({"refine_iterations": True}),
        lambda: json.dumps({"refine_preset": word}),
        lambda: json.dumps({"refine_preset": rng.randint(-5, 5)}),
        lambda: json.dumps({"image": "/etc/" + word}),
        lambda: json.dumps({"device": "cuda:7", "refine_preset": "fast"}),
        lambda: json.dumps([1, 2, 3]),
        lambda: json.dumps(word),
        lambda: "{" + word,
        lambda: json.dumps({word * 1000: None}),
    ]
    return rng.choice(choices)()


def test_malformed_params_in_a_row_then_a_good_request_answers_correctly(server, first_answer):
    rng = random.Random(32)
    for attempt in range(20):
        params = _malformed_params(rng)
        start = time.monotonic()
        status, _, body = _infer(server.base, IMAGE_ID, params, timeout=30)
        assert status == 422, f"request {attempt} params {params[:200]!r}: {status} {body[:1000]!r}"
        assert time.monotonic() - start < 10, "a refused request must be answered before any registration"
        _assert_still_answering(server)
    status, content_type, body, _ = client.infer(server.base, IMAGE_ID)
    assert status == 200, f"{status}: {body[:2000]!r}\n{client._log_tail(server.log)}"
    label = np.asarray(client.parse_infer_answer(content_type, body)[1].dataobj)
    first = np.asarray(client.parse_infer_answer(*first_answer)[1].dataobj)
    assert label.shape == first.shape and np.mean(label == first) > 0.99


def test_two_concurrent_requests_both_get_label_maps_and_info_answers_meanwhile(server):
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(client.infer, server.base, IMAGE_ID) for _ in range(2)]
        polls = []
        while not all(f.done() for f in futures):
            start = time.monotonic()
            status = client.request(f"{server.base}/info/", timeout=10)[0]  # the old server held it until the end
            polls.append((status, time.monotonic() - start))
            time.sleep(1)
        answers = [f.result() for f in futures]
    assert polls and all(status == 200 for status, _ in polls), polls
    assert max(seconds for _, seconds in polls) < 5, polls
    shape = nib.load(DATA / "subject_a_image.nii.gz").shape
    for status, content_type, body, _ in answers:
        assert status == 200, f"{status}: {body[:2000]!r}"
        assert client.parse_infer_answer(content_type, body)[1].shape == shape
    _assert_still_answering(server)


LIMIT_SECONDS = 3


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory):
    """A second server, ``--conf max_request_seconds 3`` (a registration takes longer) and no queue."""
    if requires_shared_data.args[0]:
        pytest.skip(requires_shared_data.kwargs["reason"])
    work = tmp_path_factory.mktemp("monailabel_limited")
    studies = work / "studies"
    studies.mkdir()
    shutil.copy(DATA / "subject_a_image.nii.gz", studies)
    log = work / "server.log"
    conf = client.atlas_conf(
        DATA, refine_iterations="0", max_request_seconds=str(LIMIT_SECONDS), max_queued_requests="0"
    )
    with client.running_server(studies, conf, log, threads=THREADS) as base:
        deadline = time.monotonic() + 120  # a child process that imports torch and MONAI: not counted in the limit
        while "registration worker ready" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.5)
        yield SimpleNamespace(base=base, log=log)


def test_a_request_past_the_time_limit_ends_with_504_and_a_full_queue_answers_503(limited_server):
    def timed() -> tuple[int, dict, bytes, float]:
        start = time.monotonic()
        return *_infer(limited_server.base, IMAGE_ID, timeout=120), time.monotonic() - start

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(timed)
        time.sleep(0.5)
        second = pool.submit(timed)
        answers = sorted([first.result(), second.result()], key=lambda answer: answer[0])
    (busy, busy_headers, busy_body, _), (late, _, late_body, late_seconds) = answers
    assert (busy, late) == (503, 504), answers
    assert "busy" in _detail(busy_body) and "retry-after" in {k.lower() for k in busy_headers}
    assert "max_request_seconds" in _detail(late_body) and late_seconds < LIMIT_SECONDS + 10, late_seconds
    _assert_still_answering(limited_server)
    # the stopped registration freed the slot: the next request is answered within the limit again, not queued
    start = time.monotonic()
    status, _, body = _infer(limited_server.base, IMAGE_ID, timeout=120)
    assert status in (503, 504) and time.monotonic() - start < LIMIT_SECONDS + 10, (status, body)


def test_public_text_keeps_names_and_drops_server_paths(app_module):
    studies = "/data/lab/studies"
    text = (
        "image /data/lab/studies/case_1.nii.gz is truncated; cannot read /etc/passwd; "
        "'/root/.cache/x/model.pt' 2D/3D at 1/2 http://host/path"
    )
    assert app_module.public_text(text, studies) == (
        "image case_1.nii.gz is truncated; cannot read passwd; 'model.pt' 2D/3D at 1/2 http://host/path"
    )


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
