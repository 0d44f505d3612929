"""Atlas-based segmentation through a real MONAI Label server: Dice and seconds per request.

    python benchmarks/monailabel_request.py [--data ../shared/data/oasis3d] [--threads 2] [--repeats 1]
        [--conf refine_preset fast] [--png bundle/docs/monailabel_atlas_segmentation.png]

Starts ``monailabel start_server --app monailabel_app`` on 127.0.0.1 (a free port) with a studies folder holding
``subject_a_image.nii.gz`` and the atlas = subject_b (image, labels, the FreeSurfer name table), sends
``POST /infer/atlas_registration?image=subject_a_image`` as 3D Slicer's MONAI Label module does, and prints the mean
Dice of the returned label map against subject_a's own labels over the 30 structures of ``eval_labels.json``, next to
the atlas labels placed without registration, and the seconds per request (client wall time; the server's
registration time from the answer's ``params``). The server is stopped whatever happens. The test
``tests/test_monailabel_app.py`` uses the same helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import email.policy
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "monailabel_app"
MODEL = "atlas_registration"
LABEL_NAMES = APP / "freesurfer_aseg_labels.json"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "oasis3d"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def atlas_conf(data: Path, **extra: str) -> dict[str, str]:
    """The app's ``--conf`` for the atlas subject_b of ``data`` (plus ``extra`` keys such as ``refine_preset``)."""
    return {
        "atlas_image": str(data / "subject_b_image.nii.gz"),
        "atlas_label": str(data / "subject_b_label.nii.gz"),
        "atlas_label_names": str(LABEL_NAMES),
        **extra,
    }


def request(url: str, method: str = "GET", timeout: float = 600) -> tuple[int, str, bytes]:
    """``(status, content type, body)`` of one HTTP request; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, data=None), timeout=timeout) as answer:
            return answer.status, answer.headers.get("content-type", ""), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("content-type", ""), error.read()


def _log_tail(log: Path, characters: int = 4000) -> str:
    return log.read_text(errors="replace")[-characters:] if log.is_file() else "(no log)"


@contextlib.contextmanager
def running_server(
    studies: Path, conf: dict[str, str], log: Path, threads: int = 2, timeout: float = 180
) -> Iterator[str]:
    """Start ``monailabel start_server`` for the app (what the ``monailabel`` script runs: ``python -m
    monailabel.main``, here with this interpreter), wait until ``/info/`` answers, yield the base URL; stop the
    server's whole process group on exit, whatever happened. Start-up failures raise with the server's log tail."""
    port = free_port()
    command = [
        sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    for key, value in conf.items():
        command += ["--conf", key, str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the MONAI Label server exited with code {server.returncode}:\n{_log_tail(log)}")
            with contextlib.suppress(OSError):
                if request(f"{base}/info/", timeout=5)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the MONAI Label server did not answer /info/ in {timeout:.0f} s:\n{_log_tail(log)}"
                )
            time.sleep(0.5)
        yield base
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still there after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_infer_answer(content_type: str, body: bytes) -> tuple[dict, nib.Nifti1Image]:
    """The ``params`` JSON and the label NIfTI of an ``/infer`` answer (``multipart/form-data``, the default)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    if "params" not in parts or "image" not in parts:
        raise ValueError(f"expected the parts 'params' and 'image' in the answer, got {sorted(parts)}")
    params = json.loads(parts["params"].get_payload(decode=True))
    data = parts["image"].get_payload(decode=True)
    return params, nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def infer(base: str, image_id: str, model: str = MODEL) -> tuple[int, str, bytes, float]:
    """``POST /infer/<model>?image=<id>``: status, content type, body and the client's wall seconds."""
    start = time.perf_counter()
    status, content_type, body = request(f"{base}/infer/{model}?image={image_id}", method="POST")
    return status, content_type, body, time.perf_counter() - start


def to_atlas_ids(params: dict, pred: np.ndarray) -> np.ndarray:
    """``pred``'s values 1..N back to the atlas' label ids, through the answer's ``label_names`` (name -> value) and
    ``atlas_label_ids`` (name -> atlas id)."""
    values = params["label_names"]
    lookup = np.zeros(max(values.values()) + 1, dtype=np.int64)
    for name, value in values.items():
        lookup[value] = params["atlas_label_ids"][name]
    return lookup[pred]


def mean_dice(reference: np.ndarray, candidate: np.ndarray, label_ids: list[int]) -> float:
    """Mean Dice over ``label_ids`` (the bundle's ``dice_per_label``: a structure missing from one map scores 0)."""
    sys.path.insert(0, str(REPO / "bundle"))
    from scripts.metrics import dice_per_label

    return float(np.mean(list(dice_per_label(reference, candidate, label_ids).values())))


def eval_label_ids(data: Path) -> list[int]:
    return [int(i) for i in json.loads((data / "eval_labels.json").read_text())["labels"]]


def save_overlay_png(path: Path, image: np.ndarray, labels: dict[str, np.ndarray]) -> None:
    """Middle axial slice of ``image`` with each label map over it, one panel each (what an annotator sees)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = image.shape[2] // 2
    figure, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 4.6))
    for axis, (title, label) in zip(np.atleast_1d(axes), labels.items()):
        axis.imshow(image[:, :, z].T, cmap="gray", origin="lower")
        shown = np.ma.masked_equal(label[:, :, z].T % 20, 0)  # aseg ids up to 255 -> 20 distinguishable colours
        axis.imshow(shown, cmap="tab20", origin="lower", alpha=0.45, interpolation="nearest", vmin=0, vmax=19)
        axis.set_title(title)
        axis.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with subject_{a,b}_{image,label}.nii.gz")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="app --conf")
    parser.add_argument("--png", default=None, help="write an overlay figure of the last answer here")
    args = parser.parse_args()
    data = Path(args.data)
    fixed = nib.load(data / "subject_a_image.nii.gz")
    reference = np.asarray(nib.load(data / "subject_a_label.nii.gz").dataobj)
    atlas_label = np.asarray(nib.load(data / "subject_b_label.nii.gz").dataobj)
    ids = eval_label_ids(data)
    with tempfile.TemporaryDirectory() as work:
        studies = Path(work) / "studies"
        studies.mkdir()
        shutil.copy(data / "subject_a_image.nii.gz", studies)
        log = Path(work) / "server.log"
        conf = atlas_conf(data, **dict(args.conf))
        print(f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}, conf {dict(args.conf) or 'default'}")
        start = time.perf_counter()
        with running_server(studies, conf, log, threads=args.threads) as base:
            print(f"server answered /info/ after {time.perf_counter() - start:.1f} s")
            for repeat in range(args.repeats):
                status, content_type, body, seconds = infer(base, "subject_a_image")
                if status != 200:
                    raise SystemExit(f"request failed ({status}): {body[:2000]!r}\n{_log_tail(log)}")
                params, label = parse_infer_answer(content_type, body)
                warped = to_atlas_ids(params, np.asarray(label.dataobj))
                registration = params["registration"]
                print(
                    f"request {repeat + 1}: {seconds:.1f} s (server: registration {registration['seconds']:.1f} s, "
                    f"reading to writing {registration['seconds_load_to_write']:.1f} s); shape {warped.shape}, "
                    f"affine equal to the image's: {np.allclose(label.affine, fixed.affine)}"
                )
    unregistered, registered = mean_dice(reference, atlas_label, ids), mean_dice(reference, warped, ids)
    print(f"mean Dice, {len(ids)} structures of eval_labels.json: atlas labels unregistered {unregistered:.3f}, "
          f"via MONAI Label {registered:.3f}")  # fmt: skip
    if args.png:
        save_overlay_png(
            Path(args.png),
            np.asarray(fixed.dataobj),
            {
                "atlas labels, unregistered": atlas_label,
                "MONAI Label answer (pred)": warped,
                "image's own labels": reference,
            },
        )
        print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
