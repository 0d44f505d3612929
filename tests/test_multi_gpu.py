"""multi_gpu_train.yaml under torchrun with two CPU processes (gloo): the DDP path CI can run without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import CONFIGS, REPO, check_ok, run_bundle

TRAIN = str(CONFIGS / "train.yaml")
MULTI = str(CONFIGS / "multi_gpu_train.yaml")


def test_two_process_training_splits_pairs_saves_once_and_evaluates(tmp_path):
    overrides = {
        "synthetic_dir": tmp_path / "synthetic",
        "synthetic#num_subjects": 10,
        "synthetic#num_validation": 2,
        "synthetic#num_test": 2,
        "output_dir": tmp_path / "out",
        "ckpt_dir": tmp_path / "models",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        f"['{TRAIN}','{MULTI}']",
    ]
    train = {**overrides, "max_epochs": 2, "num_pairs_per_epoch": 8, "batch_size": 2, "val_interval": 1}
    for key, value in train.items():
        command += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    output = check_ok(process)
    # 8 pairs an epoch over 2 ranks in batches of 2: 2 iterations a rank (4 without the DistributedSampler)
    assert "[2/2]" in output and "[4/4]" not in output
    # only rank 0 reports and saves
    assert output.count("registration report (epoch 2)") == 1
    assert output.count("model_final.pt") == 1
    assert (tmp_path / "models" / "model.pt").is_file()
    # the DDP checkpoint is a plain state dict: single-process evaluation loads it
    check_ok(run_bundle("evaluating", [TRAIN, str(CONFIGS / "evaluate.yaml")], {**overrides, "eval_hd95": False}))
    assert (tmp_path / "out" / "eval" / "metrics.json").is_file()
