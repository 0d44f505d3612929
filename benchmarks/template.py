"""Evidence for the learned template (``bundle/configs/template.yaml``), printed as markdown tables with figures.

    python benchmarks/template.py synthetic    # synthetic 2D brains: sharpness, atlas-based segmentation, centrality
    python benchmarks/template.py mnist        # conditional template: one MNIST template per digit class
    python benchmarks/template.py sizes        # conditional template of synthetic brains of three known sizes
    python benchmarks/template.py cohort       # the real 2D cohort: template, mean image, atlas-based segmentation

``synthetic`` trains the template overlay on the default synthetic 2D data twice with the bundle CLI, as a user would
(``--centrality_weight 0`` and the default), then, with the trained network of the default run:

- sharpness (root-mean-square gradient magnitude) of the learned template and of the voxel-wise mean of the same
  training images;
- atlas-based segmentation of the held-out ``test`` subjects (never seen in training or validation): mean Dice of the
  atlas labels registered onto each subject, for three atlases — the learned template with its majority-vote labels
  (read back from the files the workflow wrote, through the bundle's preprocessing, as ``pair_mode: atlas`` would), the
  mean image with the voxel-wise majority of the (unregistered) training labels, and each training subject with its own
  labels (a randomly chosen subject: mean, worst and best over all of them) — registered and unregistered;
- centrality: ``mean_x |mean_s u_s(x)|`` (voxels), the mean displacement template -> training subjects, without and
  with the centrality term;
- the generator's truth: the synthetic subjects are one template anatomy deformed at random, so the Dice of the learned
  template's labels with that anatomy says how close the template came to the population's true shape.

``mnist`` trains the conditional overlay (``template_mnist.yaml``: all ten classes, the class as attribute) and
draws, per digit, the voxel-wise mean of its training digits above its learned template; per class it prints the
sharpness of both and the Dice of the template's foreground (majority vote) registered onto the held-out test digits
of that class, against no registration.

``sizes`` generates synthetic 2D brains in three size classes (``--synthetic#num_size_classes 3``: the anatomy scaled
by 0.88, 1.00, 1.12 before each subject's random deformation, the class as attribute), trains the conditional overlay
on them, and compares each class's template labels with the generator's anatomy scaled by that class's factor (the
known answer): foreground area and Dice, against the voxel-wise majority of the class's unregistered training labels.

Figures: ``bundle/docs/template_synthetic.png``, ``template_mnist.png``, ``template_sizes.png``; numbers also go to
``<work>/template_results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DOCS = REPO / "bundle" / "docs"
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tutorial import bundle  # noqa: E402

TEMPLATE = [str(CONFIGS / "train.yaml"), str(CONFIGS / "template.yaml")]


def latest_run(output_dir: Path) -> Path:
    runs = sorted((output_dir / "runs").iterdir())
    if not runs:
        raise SystemExit(f"no run folder under {output_dir / 'runs'}")
    return runs[-1]


def load_run(configs: list[str], overrides: dict, run_dir: Path):
    """The trained ``TemplateRegistration`` of ``run_dir`` (final weights), the parser and the preprocessed subjects."""
    from monai.bundle import ConfigParser
    from monai.data import Dataset

    from scripts.datalist import load_section

    parser = ConfigParser()
    parser.read_config(configs)
    parser.update({key: str(value) if isinstance(value, Path) else value for key, value in overrides.items()})
    network = parser.get_parsed_content("template_net")
    network.load_state_dict(torch.load(run_dir / "model_final.pt", map_location="cpu", weights_only=True))
    network.eval()
    datalist, base = parser.get_parsed_content("datalist"), parser.get_parsed_content("dataset_dir")
    preprocessing = parser.get_parsed_content("preprocessing")
    train = list(Dataset(load_section(datalist, "training", base), preprocessing))
    test = list(Dataset(load_section(datalist, "test", base), preprocessing))
    return parser, network, train, test, preprocessing


def _batch(tensor) -> torch.Tensor:
    tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    return tensor.float().unsqueeze(0)


@torch.no_grad()
def segmentation_dice(
    network, atlas_image, atlas_label, subjects, register: bool = True, label_ids: list[int] | None = None
) -> float:
    """Mean over ``subjects`` of the mean Dice (labels present in both, among ``label_ids`` when given) of the atlas
    labels moved onto each subject."""
    from monai.networks.blocks import Warp

    from scripts.metrics import dice_per_label, labels_to_score

    warp = Warp(mode="nearest", padding_mode="zeros")
    scores = []
    for subject in subjects:
        fixed = _batch(subject["image"])
        label = _batch(atlas_label)
        if register:
            label = warp(label, network(torch.cat([_batch(atlas_image), fixed], dim=1)))
        fixed_label = subject["label"][0].numpy().round().astype(np.int32)
        moved = label[0, 0].numpy().round().astype(np.int32)
        ids = labels_to_score(fixed_label, moved, label_ids)
        scores.append(float(np.mean(list(dice_per_label(fixed_label, moved, ids).values()))))
    return float(np.mean(scores))


def mode_labels(subjects) -> torch.Tensor:
    """Voxel-wise majority of the subjects' (unregistered) labels, ``(1, *spatial)``."""
    labels = torch.stack([s["label"].as_tensor().round().long() for s in subjects])
    values = torch.unique(labels)
    counts = torch.stack([(labels == v).sum(dim=0) for v in values])
    return values[counts.argmax(dim=0)]


def dice_mean(a: np.ndarray, b: np.ndarray) -> float:
    from scripts.metrics import dice_per_label, labels_to_score

    a, b = np.asarray(a).round().astype(np.int32), np.asarray(b).round().astype(np.int32)
    return float(np.mean(list(dice_per_label(a, b, labels_to_score(a, b, None)).values())))


def atlas_segmentation(network, atlas, mean, mean_label, train, test, label_ids=None) -> dict:
    """Atlas-based segmentation of ``test``, unregistered and registered: the learned template with its labels, the
    voxel-wise mean with the majority of the unregistered training labels, and each ``train`` subject with its own
    labels (mean, worst and best over them)."""
    rows = {}
    for register in (False, True):
        per_subject = [segmentation_dice(network, s["image"], s["label"], test, register, label_ids) for s in train]
        rows["registered" if register else "unregistered"] = {
            "learned template": segmentation_dice(network, atlas["image"], atlas["label"], test, register, label_ids),
            "mean image": segmentation_dice(network, mean, mean_label, test, register, label_ids),
            "random subject (mean)": float(np.mean(per_subject)),
            "random subject (worst)": float(np.min(per_subject)),
            "random subject (best)": float(np.max(per_subject)),
        }
    return rows


def print_atlas_tables(results: dict, train_subjects: int, test_subjects: int) -> None:
    print(f"\n{train_subjects} training subjects, {test_subjects} held-out test subjects\n")
    print("| image | sharpness (RMS gradient, intensity per voxel) |\n|---|---|")
    print(f"| voxel-wise mean | {results['sharpness']['mean']:.4f} |")
    print(f"| learned template | {results['sharpness']['learned']:.4f} |")
    rows = results["segmentation"]
    print("\n| atlas | Dice, unregistered | Dice, registered |\n|---|---|---|")
    for name in rows["registered"]:
        print(f"| {name} | {rows['unregistered'][name]:.3f} | {rows['registered'][name]:.3f} |")


def draw_panels(panels: list, path: Path, vmax_labels: float) -> None:
    """One row of images (``(title, array, colormap)``), grey ones in [0, 1], label maps in [0, ``vmax_labels``]."""
    figure, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for axis, (title, image, cmap) in zip(axes, panels):
        vmax = 1.0 if cmap == "gray" else vmax_labels
        axis.imshow(np.rot90(np.squeeze(image)), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


def cohort(work: Path, threads: int, epochs: int, data: Path, atlas_subjects: int = 40) -> dict:
    """The learned template of the real 2D cohort (all 365 training subjects of ``oasis2d_train.json``, trained from
    scratch through ``train.yaml + oasis2d.yaml + template.yaml``) beside the voxel-wise mean, and atlas-based
    segmentation of the 20 cohort-test subjects through it, against the mean image and against single training
    subjects (the first ``atlas_subjects`` of the training section) as atlases; Dice over ``eval_labels.json``."""
    import tutorial_cohort

    from scripts.template import mean_image, sharpness

    tutorial_cohort.require_cohort(data)
    configs = [str(CONFIGS / "train.yaml"), str(CONFIGS / "oasis2d.yaml"), str(CONFIGS / "template.yaml")]
    label_file = data / "oasis3d" / "eval_labels.json"
    overrides = {
        "datalist": tutorial_cohort.cohort_datalist(work / "cohort_datalists"),
        "output_dir": work / "cohort",
        **tutorial_cohort.FROM_SCRATCH,
        **({"eval_label_ids": label_file} if label_file.is_file() else {}),
    }
    if epochs:
        overrides.update(max_epochs=epochs, val_interval=epochs, template_interval=epochs)
    bundle("training", configs, overrides, threads)
    run_dir = latest_run(work / "cohort")
    parser, network, train, test, preprocessing = load_run(configs, overrides, run_dir)
    label_ids = json.loads(label_file.read_text())["labels"] if label_file.is_file() else None
    atlas = preprocessing(
        {
            "image": str(run_dir / "template" / "template.nii.gz"),
            "label": str(run_dir / "template" / "template_label.nii.gz"),
        }
    )
    mean, mean_label = mean_image(train), mode_labels(train)
    results: dict = {"sharpness": {"learned": sharpness(atlas["image"]), "mean": sharpness(mean)}}
    rows = atlas_segmentation(network, atlas, mean, mean_label, train[:atlas_subjects], test, label_ids)
    results["segmentation"] = rows
    results["train_subjects"], results["test_subjects"] = len(train), len(test)
    print_atlas_tables(results, len(train), len(test))
    panels = [
        ("voxel-wise mean", mean[0].numpy(), "gray"),
        ("learned template", atlas["image"][0].numpy(), "gray"),
        ("its labels (vote)", atlas["label"][0].numpy(), "nipy_spectral"),
        ("mean image's labels", mean_label[0].numpy(), "nipy_spectral"),
        ("a training subject", train[0]["image"][0].numpy(), "gray"),
    ]
    draw_panels(panels, DOCS / "template_cohort.png", 64)
    return results


def synthetic(work: Path, threads: int, epochs: int) -> dict:
    from scripts.datalist import load_atlas
    from scripts.template import mean_displacement, mean_image, sharpness

    results: dict = {}
    runs = {}
    for name, centrality in (("no_centrality", 0.0), ("learned", None)):
        overrides = {"output_dir": work / name}
        if epochs:
            overrides.update(max_epochs=epochs, val_interval=epochs)
        if centrality is not None:
            overrides["centrality_weight"] = centrality
        bundle("training", TEMPLATE, overrides, threads)
        run_dir = latest_run(work / name)
        parser, network, train, test, preprocessing = load_run(TEMPLATE, overrides, run_dir)
        runs[name] = (run_dir, network)
        results[f"{name}_mean_displacement"] = mean_displacement(network, train)
    run_dir, network = runs["learned"]
    atlas = preprocessing(
        {
            "image": str(run_dir / "template" / "template.nii.gz"),
            "label": str(run_dir / "template" / "template_label.nii.gz"),
        }
    )
    mean = mean_image(train)
    mean_label = mode_labels(train)
    results["sharpness"] = {"learned": sharpness(atlas["image"]), "mean": sharpness(mean)}
    results["segmentation"] = atlas_segmentation(network, atlas, mean, mean_label, train, test)
    datalist, base = parser.get_parsed_content("datalist"), parser.get_parsed_content("dataset_dir")
    truth = preprocessing(load_atlas(datalist, base))
    results["truth_dice"] = {
        "learned template labels": dice_mean(atlas["label"][0].numpy(), truth["label"][0].numpy()),
        "mean image labels (voxel-wise majority)": dice_mean(mean_label[0].numpy(), truth["label"][0].numpy()),
    }
    results["train_subjects"], results["test_subjects"] = len(train), len(test)

    print_atlas_tables(results, len(train), len(test))
    print("\n| training | mean displacement template -> subjects (voxels) |\n|---|---|")
    print(f"| without centrality (`--centrality_weight 0`) | {results['no_centrality_mean_displacement']:.3f} |")
    print(f"| with centrality (default) | {results['learned_mean_displacement']:.3f} |")
    print("\n| labels in template space | Dice with the generator's true anatomy |\n|---|---|")
    for name, value in results["truth_dice"].items():
        print(f"| {name} | {value:.3f} |")

    no_centrality_template = np.asarray(runs["no_centrality"][1].template()[0, 0].detach())
    panels = [
        ("voxel-wise mean", mean[0].numpy(), "gray"),
        ("learned template", atlas["image"][0].numpy(), "gray"),
        ("its labels (vote)", atlas["label"][0].numpy(), "tab10"),
        ("generator's anatomy", truth["label"][0].numpy(), "tab10"),
        ("no centrality term", no_centrality_template, "gray"),
    ]
    draw_panels(panels, DOCS / "template_synthetic.png", 9)
    return results


def sizes(work: Path, threads: int, epochs: int, reuse: bool = False) -> dict:
    from scripts.synthetic import SyntheticSpec, generate_subjects, scaled_anatomy, size_class

    overrides = {
        "output_dir": work / "sizes",
        "synthetic_dir": work / "synthetic_sizes",
        "synthetic#num_size_classes": 3,
        "template_attributes": 3,
    }
    if epochs:
        overrides.update(max_epochs=epochs, val_interval=epochs, template_interval=epochs)
    if not (reuse and (work / "sizes" / "runs").is_dir()):
        bundle("training", TEMPLATE, overrides, threads)
    run_dir = latest_run(work / "sizes")
    parser, network, train, test, preprocessing = load_run(TEMPLATE, overrides, run_dir)
    spec = SyntheticSpec(**parser.get_parsed_content("synthetic"))
    _, (_, anatomy) = generate_subjects(spec)
    results: dict = {}
    figure, axes = plt.subplots(3, 3, figsize=(7.5, 7.8))
    for k in range(3):
        scale = [size_class(spec, i)[1] for i in range(k, spec["num_subjects"], 3)][0]
        truth = scaled_anatomy(anatomy, scale)
        folder = run_dir / "template"
        image = np.squeeze(nib.load(folder / f"template_{k}.nii.gz").get_fdata())
        vote = np.squeeze(nib.load(folder / f"template_{k}_label.nii.gz").get_fdata()).round().astype(int)
        majority = mode_labels([s for s in train if int(s["attribute"]) == k])[0].numpy()
        results[str(k)] = {
            "scale": scale,
            "training_subjects": sum(int(s["attribute"]) == k for s in train),
            "area_truth": int((truth > 0).sum()),
            "area_template": int((vote > 0).sum()),
            "area_majority": int((majority > 0).sum()),
            "dice_template": dice_mean(vote, truth),
            "dice_majority": dice_mean(majority, truth),
        }
        for row, (title, picture, cmap) in enumerate(
            (
                (f"template, class {k}", image, "gray"),
                ("its vote labels", vote, "tab10"),
                (f"truth (x{scale:.2f})", truth, "tab10"),
            )
        ):
            vmax = float(np.percentile(picture, 99.5)) if cmap == "gray" else 9
            axes[row, k].imshow(np.rot90(picture), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            axes[row, k].set_title(title, fontsize=9)
            axes[row, k].axis("off")
    figure.tight_layout()
    figure.savefig(DOCS / "template_sizes.png", dpi=100)
    plt.close(figure)
    print(
        "\n| class | scale | training subjects | area: truth | area: template | area: majority | Dice: template |"
        " Dice: majority |\n|---|---|---|---|---|---|---|---|"
    )
    for k, row in results.items():
        print(
            f"| {k} | {row['scale']:.2f} | {row['training_subjects']} | {row['area_truth']} | {row['area_template']} | "
            f"{row['area_majority']} | {row['dice_template']:.3f} | {row['dice_majority']:.3f} |"
        )
    return results


MNIST = [str(CONFIGS / n) for n in ("train.yaml", "mnist.yaml", "template.yaml", "template_mnist.yaml")]


def mnist(work: Path, threads: int, epochs: int, reuse: bool = False) -> dict:
    from scripts.template import mean_image, sharpness

    overrides = {"output_dir": work / "mnist", "mnist_classes_dir": work / "mnist_classes"}
    if epochs:
        overrides.update(max_epochs=epochs, val_interval=epochs, template_interval=epochs)
    if not (reuse and (work / "mnist" / "runs").is_dir()):
        bundle("training", MNIST, overrides, threads)
    run_dir = latest_run(work / "mnist")
    _, network, train, test, preprocessing = load_run(MNIST, overrides, run_dir)
    results: dict = {}
    figure, axes = plt.subplots(2, 10, figsize=(13, 3.2))
    for k in range(10):
        folder = run_dir / "template"
        atlas = preprocessing(
            {"image": str(folder / f"template_{k}.nii.gz"), "label": str(folder / f"template_{k}_label.nii.gz")}
        )
        mean = mean_image([s for s in train if int(s["attribute"]) == k])
        held_out = [s for s in test if int(s["attribute"]) == k]
        with torch.no_grad():  # the written file holds the model's template of class k (before preprocessing)
            image = network.template(torch.tensor([k]))[0, 0].numpy()
        written = np.squeeze(nib.load(folder / f"template_{k}.nii.gz").get_fdata())
        assert np.allclose(image, written, atol=1e-5), "written template differs from the model's"
        results[str(k)] = {
            "sharpness_mean": sharpness(mean),
            "sharpness_template": sharpness(atlas["image"]),
            "dice_unregistered": segmentation_dice(network, atlas["image"], atlas["label"], held_out, False),
            "dice_registered": segmentation_dice(network, atlas["image"], atlas["label"], held_out, True),
            "test_digits": len(held_out),
        }
        for row, (title, picture) in enumerate(((f"mean of {k}s", mean), (f"template {k}", atlas["image"]))):
            # array axes as MNIST stores them (row, column): upright digits, no radiological rotation
            axes[row, k].imshow(np.squeeze(np.asarray(picture)), cmap="gray", vmin=0, vmax=1)
            axes[row, k].set_title(title, fontsize=8)
            axes[row, k].axis("off")
    figure.tight_layout()
    figure.savefig(DOCS / "template_mnist.png", dpi=100)
    plt.close(figure)
    print(f"\n{len(train)} training digits (all classes), {len(test)} held-out test digits\n")
    print("| digit | sharpness: class mean | sharpness: template | Dice unregistered | Dice registered |")
    print("|---|---|---|---|---|")
    for k, row in results.items():
        print(
            f"| {k} | {row['sharpness_mean']:.3f} | {row['sharpness_template']:.3f} | "
            f"{row['dice_unregistered']:.3f} | {row['dice_registered']:.3f} |"
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["synthetic", "mnist", "sizes", "cohort"])
    parser.add_argument("--work", default=str(REPO / "bundle" / "runs" / "template_evidence"), help="runs and models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=0, help="training epochs (0: the overlay's own)")
    parser.add_argument("--reuse", action="store_true", help="mnist, sizes: score the latest run in --work")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="cohort: the shared data")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    results_path = work / "template_results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.experiment == "synthetic":
        results["synthetic"] = synthetic(work, args.threads, args.epochs)
    elif args.experiment == "cohort":
        results["cohort"] = cohort(work, args.threads, args.epochs, Path(args.data))
    elif args.experiment == "sizes":
        results["sizes"] = sizes(work, args.threads, args.epochs, args.reuse)
    else:
        results["mnist"] = mnist(work, args.threads, args.epochs, args.reuse)
    results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
