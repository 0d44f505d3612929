"""Training never loses work: a folder per run, model.pt replaced only by a better model, and --resume true after a
kill -9 continues exactly where the run stopped."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, bundle_command, check_ok, run_bundle

TRAIN = str(CONFIGS / "train.yaml")


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    """A tiny labelled synthetic cohort, written before any run so that every run starts from the same RNG state."""
    from scripts.synthetic import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    spec = dict(spatial_dims=2, shape=[64, 64], num_subjects=6, num_validation=2, num_test=1)
    return ensure_synthetic_dataset(str(root / "data"), spec)


def _tiny(datalist, out, **overrides) -> dict:
    return {
        "datalist": datalist,
        "spatial_size": "[64,64]",
        "output_dir": out,
        "ckpt_dir": out / "models",
        "num_pairs_per_epoch": 4,
        "batch_size": 2,
        "val_interval": 1,
        **overrides,
    }


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


RUN = "/runs/run_b"


@pytest.mark.parametrize(
    "value, record, model_exists, overwrite, publish",
    [
        (0.5, None, False, False, True),  # nothing published yet
        (0.561, {"metric": "m", "value": 0.569, "run_dir": "/runs/run_a"}, True, False, False),  # the reported bug
        (0.570, {"metric": "m", "value": 0.569, "run_dir": "/runs/run_a"}, True, False, True),
        (0.561, {"metric": "m", "value": 0.569, "run_dir": "/runs/run_a"}, True, True, True),  # --overwrite_model
        (0.561, {"metric": "m", "value": 0.569, "run_dir": RUN}, True, False, False),  # this run's better epoch
        (0.9, None, True, False, False),  # unrecorded model.pt: quality unknown
        (0.9, {"metric": "other", "value": 0.1, "run_dir": "/runs/run_a"}, True, False, False),  # another metric
        (math.nan, {"metric": "m", "value": None, "run_dir": "/runs/run_a"}, True, False, False),  # no labels
        (math.nan, {"metric": "m", "value": None, "run_dir": RUN}, True, False, True),  # no labels, own: latest
        (0.3, {"metric": "m", "value": None, "run_dir": RUN}, True, False, True),
    ],
)
def test_publish_decision(value, record, model_exists, overwrite, publish):
    from scripts.checkpoint import publish_decision

    decided, reason = publish_decision(value, "m", record, model_exists, RUN, overwrite)
    assert decided is publish, reason
    assert reason


def test_run_folder_new_named_and_resumed(tmp_path):
    from scripts.runs import as_flag, run_folder

    runs = tmp_path / "runs"
    first, second = run_folder(str(runs)), run_folder(str(runs))
    assert first != second and os.path.isdir(first) and os.path.isdir(second)  # same second: a suffix
    with pytest.raises(FileNotFoundError, match=str(runs)):
        run_folder(str(runs), resume="true")
    for run, epochs in ((first, (1, 2)), (second, (1,))):
        os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
        for epoch in epochs:
            open(os.path.join(run, "checkpoints", f"state_checkpoint_{epoch}.pt"), "w").close()
    os.utime(os.path.join(first, "checkpoints", "state_checkpoint_2.pt"), (time.time() + 5, time.time() + 5))
    assert run_folder(str(runs), resume=True) == first  # the run saved most recently
    assert run_folder(str(runs), name=os.path.basename(second), resume=True) == second
    with pytest.raises(FileExistsError, match="--resume true"):
        run_folder(str(runs), name=os.path.basename(first))
    with pytest.raises(FileNotFoundError, match="other"):
        run_folder(str(runs), name="other", resume=True)
    assert as_flag("true", "resume") and not as_flag("false", "resume") and not as_flag(False, "resume")
    with pytest.raises(ValueError, match="--resume expects true or false"):
        as_flag("maybe", "resume")


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    """Every generator (global ones, the pair sampler's, and those nested in its augmentation) comes back."""
    import random

    from monai.transforms import Compose, RandAffined, RandGaussianNoised
    from scripts.pairs import PairDataset
    from scripts.training_state import RandomStates

    subjects = [{"image": torch.rand(1, 8, 8)} for _ in range(4)]
    augmentation = Compose(
        [
            RandAffined(keys=["moving_image"], prob=1.0, rotate_range=[0.3], padding_mode="zeros"),
            RandGaussianNoised(keys=["fixed_image"], prob=1.0),
        ]
    )
    dataset = PairDataset(subjects, num_pairs=4, transform=augmentation, seed=3)
    states = RandomStates([dataset])

    def draw():
        pair = dataset[0]
        return [pair["fixed_image"], pair["moving_image"], torch.rand(3), np.random.rand(3), random.random()]

    draw()
    torch.save(states.state_dict(), tmp_path / "random.pt")
    expected = draw()
    draw()
    states.load_state_dict(torch.load(tmp_path / "random.pt", weights_only=True))
    for got, want in zip(draw(), expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_saved_weights_are_cpu_tensors_whatever_the_training_device(tmp_path):
    """save_weights writes CPU copies (a GPU-trained model loads anywhere) of the unwrapped network's weights."""
    from scripts.checkpoint import save_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    network = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4)).to(device)
    wrapped = type("Wrapper", (), {"module": network})()  # what DistributedDataParallel exposes
    save_weights(wrapped, str(tmp_path / "model.pt"))
    state = torch.load(tmp_path / "model.pt", map_location=None, weights_only=True)
    assert list(state) == list(network.state_dict())
    for name, tensor in network.state_dict().items():
        assert state[name].device.type == "cpu" and torch.equal(state[name], tensor.cpu()), name
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind


def test_a_resumed_run_says_it_keeps_its_epoch_length(tmp_path, caplog):
    """ignite counts epochs as iteration // epoch_length, so a resumed run keeps the saved epoch length whatever
    --num_pairs_per_epoch now says: the log says so instead of ignoring the flag silently."""
    import logging

    from ignite.engine import Engine
    from scripts.training_state import TrainingState

    def training(resume: bool, epoch_length: int, max_epochs: int) -> Engine:
        engine = Engine(lambda engine, batch: None)
        TrainingState(str(tmp_path), {"network": torch.nn.Linear(1, 1)}, resume=resume).attach(engine)
        engine.run(range(epoch_length), max_epochs=max_epochs)
        return engine

    assert training(False, 4, 1).state.iteration == 4
    with caplog.at_level(logging.WARNING):
        resumed = training(True, 2, 2)
    assert resumed.state.epoch_length == 4 and resumed.state.iteration == 8  # epoch 2 of 4 iterations
    assert "keeps its epoch length of 4 iterations (this configuration gives 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        training(True, 4, 3)  # the same epoch length: nothing to say
    assert "epoch length" not in caplog.text


def test_rerun_keeps_the_better_published_model(tmp_path, datalist):
    out = tmp_path / "out"
    check_ok(run_bundle("training", [TRAIN], _tiny(datalist, out, max_epochs=1)))
    models = out / "models"
    record = json.loads((models / "model.json").read_text())
    assert record["metric"] == "val_mean_dice" and 0.0 < record["value"] < 1.0 and record["epoch"] == 1
    # the first run's model is the better one (its recorded Dice beats anything this tiny training reaches)
    record["value"] = 0.99
    (models / "model.json").write_text(json.dumps(record))
    published = _digest(models / "model.pt")

    output = check_ok(run_bundle("training", [TRAIN], _tiny(datalist, out, max_epochs=1, seed=1)))
    assert "kept published" in output and "does not beat" in output and "--overwrite_model true" in output
    assert _digest(models / "model.pt") == published
    assert json.loads((models / "model.json").read_text())["run"] == record["run"]
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2 and runs[0].name == record["run"]
    for run in runs:  # each run keeps its own events, report and weights
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) >= 1
        assert (run / "validation" / "metrics.json").is_file() and (run / "model.pt").is_file()
    assert _digest(runs[1] / "model.pt") != published

    output = check_ok(
        run_bundle("training", [TRAIN], _tiny(datalist, out, max_epochs=1, seed=1, overwrite_model="true"))
    )
    assert "--overwrite_model true replaces the published model" in output
    third = json.loads((models / "model.json").read_text())["run"]
    assert third not in (runs[0].name, runs[1].name) and _digest(models / "model.pt") != published


def _state_epochs(run_dir) -> list[int]:
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in (run_dir / "checkpoints").glob("state_checkpoint_*.pt"))


def test_killed_training_resumes_exactly_where_it_stopped(tmp_path, datalist):
    max_epochs = 5
    reference = tmp_path / "reference"
    check_ok(run_bundle("training", [TRAIN], _tiny(datalist, reference, max_epochs=max_epochs, run_name="run")))

    out = tmp_path / "out"
    command, env = bundle_command("training", [TRAIN], _tiny(datalist, out, max_epochs=max_epochs, run_name="run"))
    run_dir = out / "runs" / "run"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not _state_epochs(run_dir) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    killed_at = _state_epochs(run_dir)
    assert killed_at and killed_at[-1] < max_epochs and not (run_dir / "model_final.pt").exists(), killed_at

    output = check_ok(run_bundle("training", [TRAIN], _tiny(datalist, out, max_epochs=max_epochs, resume="true")))
    assert f"resumed run {run_dir}" in output
    assert f"epoch {killed_at[-1]} of {max_epochs} complete" in output
    assert f"continuing with epoch {killed_at[-1] + 1}" in output
    assert [p.name for p in (out / "runs").iterdir()] == ["run"]  # no new run folder
    assert _state_epochs(run_dir) == [3, 4, 5]  # the last three, the killed run's older ones pruned
    assert not list(run_dir.rglob(".tmp*")) and not list((run_dir / "checkpoints").glob("tmp*"))
    state = torch.load(run_dir / "checkpoints" / "state_checkpoint_5.pt", weights_only=True)
    assert state["trainer"]["iteration"] == max_epochs * 2  # 4 pairs an epoch, batches of 2

    # network, optimiser, schedule, best metric and every random state restored: the very same weights
    for name in ("model_final.pt", "model.pt"):
        resumed = torch.load(run_dir / name, weights_only=True)
        uninterrupted = torch.load(reference / "runs" / "run" / name, weights_only=True)
        for key, value in uninterrupted.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{name} {key}")
    resumed, uninterrupted = (json.loads((root / "models" / "model.json").read_text()) for root in (out, reference))
    assert (resumed["value"], resumed["epoch"]) == (uninterrupted["value"], uninterrupted["epoch"])


def test_resume_without_a_saved_state_fails_naming_the_folder(tmp_path, datalist):
    process = run_bundle("training", [TRAIN], _tiny(datalist, tmp_path / "out", max_epochs=1, resume="true"))
    output = process.stdout + process.stderr
    assert process.returncode != 0
    assert f"no run with a saved training state in {tmp_path / 'out' / 'runs'}" in output
    assert not (tmp_path / "out" / "models").exists()


@pytest.mark.parametrize("overlays", [[], ["template.yaml"]], ids=["pairs", "template"])
def test_training_runs_the_trainers_own_iteration_and_its_events(tmp_path, datalist, overlays):
    """Both trainers plug into SupervisedTrainer's hooks, so ignite's iteration events fire (and amp_kwargs applies)."""
    from monai.bundle import ConfigParser
    from monai.engines import IterationEvents

    parser = ConfigParser()
    parser.read_config([TRAIN] + [str(CONFIGS / name) for name in overlays])
    parser.update({"datalist": datalist, "output_dir": str(tmp_path), "spatial_size": [64, 64], "max_epochs": 1})
    parser.update({"num_pairs_per_epoch": 4, "subjects_per_epoch": 4, "batch_size": 2, "val_interval": 10})
    parser.update({"unet_channels": [8, 8, 8, 8], "unet_out_channels": 8, "final_conv_channels": [8], "divisor": 8})
    trainer = parser.get_parsed_content("train#trainer")
    events = ("FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED")
    fired: dict = {getattr(IterationEvents, name): 0 for name in events}
    for event in fired:
        trainer.add_event_handler(event, lambda engine, event=event: fired.__setitem__(event, fired[event] + 1))
    trainer.run()
    assert trainer.state.iteration == 2 and all(count == 2 for count in fired.values()), fired
    output = trainer.state.output
    assert torch.isfinite(output["loss"]) and {"similarity", "regularization"} <= set(output["loss_terms"])
    assert float(output["loss"]) == pytest.approx(float(output["loss_terms"]["loss"]))
