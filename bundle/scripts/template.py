"""Learned templates (atlases) built by the registration network itself (Dalca et al., NeurIPS 2019).

A template ``T`` (an image on the training grid) is a parameter trained jointly with the registration network: each
training subject ``s`` is registered from the template, ``φ = exp(v)``, ``v = g(T, s)``, and the loss asks the warped
template to look like the subject and the subject pulled back by ``φ⁻¹ = exp(-v)`` to look like the template (both
directions, as in the paper), keeps ``φ`` smooth, and keeps the template central: the mean displacement from the
template to the subjects of a batch is pushed towards zero, so ``T`` settles in the population's average shape instead
of one subject's. A conditional template adds a decoded correction per attribute value, ``T(a) = T₀ + D(onehot(a))``.

The classical route (ANTs ``buildtemplate``) alternates pairwise registrations and averaging for hours; here the
template comes out of one training run. Labels are carried into template space by majority vote of the training
subjects' labels pulled back through ``φ⁻¹``, so the template is an atlas (image + labels) for ``pair_mode: atlas``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.networks.blocks import Warp
from torch import nn

from .files import atomic_output, logger
from .registration_step import RegistrationEvalStep, TermsLoss

__all__ = [
    "LearnedTemplate",
    "SubjectBatch",
    "TemplateEvalStep",
    "TemplateInferer",
    "TemplateLoss",
    "TemplateRegistration",
    "TemplateWriter",
    "batch_attributes",
    "mean_displacement",
    "mean_image",
    "propagate_labels",
    "sharpness",
]


def _plain(image: torch.Tensor) -> torch.Tensor:
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def mean_image(subjects: Sequence[Mapping], key: str = "image") -> torch.Tensor:
    """Voxel-wise mean of the preprocessed training images, ``(1, *spatial)``: the template's starting point."""
    if len(subjects) == 0:
        raise ValueError("a template needs at least one training subject; the training section is empty")
    total = None
    for subject in subjects:
        image = _plain(subject[key]).float()
        total = image.clone() if total is None else total + image
    return total / len(subjects)


def sharpness(image: np.ndarray | torch.Tensor, sigma: float = 1.0) -> float:
    """Root-mean-square Gaussian gradient magnitude, ``sqrt(mean |∇(G_σ * I)|²)`` per voxel (σ in voxels).

    Why squared: blurring an edge spreads its step over more voxels, which leaves ``mean |∇I|`` (total variation)
    almost unchanged but lowers ``mean |∇I|²``; so the blurred voxel-wise mean of a population scores low, a crisp
    template high. Why ``G_σ``: voxel-to-voxel noise would otherwise count as sharpness.
    """
    from scipy import ndimage

    array = _plain(image).cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    magnitude = ndimage.gaussian_gradient_magnitude(np.squeeze(array).astype(np.float64), sigma=sigma)
    return float(np.sqrt(np.mean(magnitude**2)))


class LearnedTemplate(nn.Module):
    """The template image as a parameter, optionally conditioned on a categorical attribute.

    ``T(a) = T₀ + D(onehot(a))``: ``T₀`` starts as the mean training image; ``D`` (only with ``num_attributes > 0``)
    maps the one-hot attribute through a linear layer onto a grid 4x coarser than the template, then two
    upsample-convolution blocks; its last convolution starts at zero, so every attribute starts from ``T₀``.

    Args:
        initial: ``(1, *spatial)`` or ``(*spatial)`` starting image, e.g. ``mean_image(train subjects)``.
        num_attributes: number of attribute classes (0: unconditional template).
        decoder_channels: feature channels of the decoder.

    ``forward(attribute=None, batch_size=1)`` -> ``(B, 1, *spatial)``; ``attribute``: ``(B,)`` integer classes.
    """

    def __init__(self, initial: torch.Tensor, num_attributes: int = 0, decoder_channels: int = 16) -> None:
        super().__init__()
        initial = _plain(torch.as_tensor(initial)).float()
        if initial.dim() >= 3 and initial.shape[0] == 1:
            initial = initial[0]
        if initial.dim() not in (2, 3):
            raise ValueError(f"template must be 2D or 3D, got shape {list(initial.shape)}")
        if not torch.isfinite(initial).all():
            raise ValueError("the initial template (mean training image) has non-finite values")
        self.spatial = list(initial.shape)
        self.spatial_dims = initial.dim()
        self.base = nn.Parameter(initial.reshape(1, 1, *self.spatial).clone())
        self.num_attributes = int(num_attributes)
        if self.num_attributes > 0:
            self.coarse = [-(-n // 4) for n in self.spatial]
            conv = nn.Conv2d if self.spatial_dims == 2 else nn.Conv3d
            self.embed = nn.Linear(self.num_attributes, decoder_channels * int(np.prod(self.coarse)))
            self.decoder = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                conv(decoder_channels, decoder_channels, 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.Upsample(scale_factor=2, mode="nearest"),
                conv(decoder_channels, decoder_channels, 3, padding=1),
                nn.LeakyReLU(0.2),
                conv(decoder_channels, 1, 3, padding=1),
            )
            nn.init.zeros_(self.decoder[-1].weight)
            nn.init.zeros_(self.decoder[-1].bias)
            self.decoder_channels = decoder_channels

    def forward(self, attribute: torch.Tensor | None = None, batch_size: int = 1) -> torch.Tensor:
        if self.num_attributes == 0:
            return self.base.expand(batch_size if attribute is None else len(attribute), *self.base.shape[1:])
        if attribute is None:
            raise ValueError("a conditional template needs the attribute of every subject (datalist 'attribute')")
        attribute = torch.as_tensor(attribute, device=self.base.device).long().flatten()
        if attribute.min() < 0 or attribute.max() >= self.num_attributes:
            raise ValueError(f"attribute values must be 0..{self.num_attributes - 1}, got {attribute.tolist()}")
        codes = self.embed(F.one_hot(attribute, self.num_attributes).float())
        features = self.decoder(codes.view(len(attribute), self.decoder_channels, *self.coarse))
        for axis, size in enumerate(self.spatial):
            features = features.narrow(axis + 2, 0, size)
        return self.base + features


class TemplateRegistration(nn.Module):
    """The registration network and its learned template as one module, so the checkpoints, the published model, the
    optimiser and ``--resume`` carry both. ``forward``, ``velocity`` and its two halves ``pooled_pair``/
    ``velocity_from_pooled``, ``field_to_ddf`` and its two halves ``integrate``/``upsample_ddf``
    (``scripts.network.RegistrationNet``'s interface) are the registration network's:
    the trained network still registers any ``cat(moving, fixed)`` pair (e.g. the template onto a new subject)."""

    def __init__(self, registration: nn.Module, template: LearnedTemplate) -> None:
        super().__init__()
        self.registration, self.template = registration, template
        self.downsample = getattr(registration, "downsample", 1)

    def forward(self, moving_fixed: torch.Tensor) -> torch.Tensor:
        return self.registration(moving_fixed)

    def velocity(self, moving_fixed: torch.Tensor) -> torch.Tensor:
        return self.registration.velocity(moving_fixed)

    def pooled_pair(self, moving_fixed: torch.Tensor) -> torch.Tensor:
        return self.registration.pooled_pair(moving_fixed)

    def velocity_from_pooled(self, pooled: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        return self.registration.velocity_from_pooled(pooled, spatial)

    def field_to_ddf(self, field: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        return self.registration.field_to_ddf(field, spatial)

    def integrate(self, field: torch.Tensor) -> torch.Tensor:
        return self.registration.integrate(field)

    @property
    def integration_steps(self) -> int | None:
        return getattr(self.registration, "integration_steps", None)

    def upsample_ddf(self, ddf: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        return self.registration.upsample_ddf(ddf, spatial)


def _unwrap(network: nn.Module) -> TemplateRegistration:
    network = getattr(network, "module", network)  # DistributedDataParallel
    if not isinstance(network, TemplateRegistration):
        raise TypeError(
            f"the template workflow needs scripts.template.TemplateRegistration as network, got {type(network)}"
        )
    return network


def batch_attributes(batch: Mapping) -> torch.Tensor | None:
    """The batch's ``attribute`` entries as a ``(B,)`` tensor, or None when the datalist has none."""
    if "attribute" not in batch:
        return None
    return torch.as_tensor(batch["attribute"]).flatten()


def _template_and_fields(network: nn.Module, subject: torch.Tensor, attribute):
    """``T(a)``, the DDF of ``φ`` (template -> subject grid) and of ``φ⁻¹``, both ``(B, d, *spatial)``."""
    network = _unwrap(network)
    images = network.template(attribute, batch_size=subject.shape[0])
    velocity = network.velocity(torch.cat([images, subject], dim=1))
    spatial = subject.shape[2:]
    return images, network.field_to_ddf(velocity, spatial), network.field_to_ddf(-velocity, spatial)


class TemplateLoss(TermsLoss):
    """``½ Sim(T∘φ, s) + ½ Sim(s∘φ⁻¹, T) + λ · Reg(φ) + λ_c · mean_x |mean_batch u(x)|²``, the trainer's
    ``loss_function(pred, subject)`` with ``pred`` from ``TemplateInferer``.

    ``u`` is the displacement of ``φ`` in voxels; the last (centrality) term is the squared mean displacement over the
    subjects of a batch, the paper's ``‖ū‖²``, so the template moves towards the average shape.

    Args:
        image_loss: similarity, e.g. ``BoxLNCCLoss`` or ``MSELoss``.
        regularization: smoothness penalty on the DDF, e.g. ``BendingEnergyLoss``.
        regularization_weight: λ.
        centrality_weight: λ_c; 0 switches the centrality term off.
        bidirectional: False keeps only the template -> subject similarity.
    """

    uses_labels = False

    def __init__(
        self,
        image_loss: nn.Module,
        regularization: nn.Module,
        regularization_weight: float = 1.0,
        centrality_weight: float = 0.01,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        self.image_loss, self.regularization = image_loss, regularization
        self.regularization_weight, self.centrality_weight = float(regularization_weight), float(centrality_weight)
        self.bidirectional = bool(bidirectional)
        self.warp = Warp(mode="bilinear", padding_mode="border")

    def forward(self, pred: Mapping[str, torch.Tensor], subject: torch.Tensor) -> torch.Tensor:
        return self._kept(self.terms(pred["template"], subject, pred["ddf"], pred["inverse_ddf"]))

    def terms(
        self, template: torch.Tensor, subject: torch.Tensor, ddf: torch.Tensor, inverse_ddf: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``similarity``, ``regularization``, ``centrality`` and their weighted sum ``loss``."""
        similarity = self.image_loss(self.warp(template, ddf), subject)
        if self.bidirectional:
            similarity = 0.5 * (similarity + self.image_loss(self.warp(subject, inverse_ddf), template))
        terms = {
            "similarity": similarity,
            "regularization": self.regularization(ddf),
            "centrality": ddf.mean(dim=0).pow(2).mean(),
        }
        terms["loss"] = (
            similarity
            + self.regularization_weight * terms["regularization"]
            + self.centrality_weight * terms["centrality"]
        )
        return terms


class SubjectBatch:
    """The template trainer's ``prepare_batch``: subjects ``{image, attribute?}`` -> ``(image, image, (),
    {"attribute": ...})``: the subjects are both the input and the target, their attributes go to the inferer."""

    def __call__(
        self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        subject = _plain(batchdata["image"]).to(device, non_blocking=non_blocking, **kwargs)
        return subject, subject, (), {"attribute": batch_attributes(batchdata)}

    @staticmethod
    def describe(batchdata: Mapping) -> str:
        """The subjects of a batch, for error messages."""
        return "subjects " + str(_names(batchdata))


class TemplateInferer:
    """The template trainer's ``inferer``: subjects -> ``{"template": T(a), "ddf": φ, "inverse_ddf": φ⁻¹}``."""

    def __call__(
        self, subject: torch.Tensor, network: nn.Module, attribute: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        template, ddf, inverse_ddf = _template_and_fields(network, subject, attribute)
        return {"template": template, "ddf": ddf, "inverse_ddf": inverse_ddf}


def _names(batch: Mapping) -> list[str]:
    meta = getattr(batch["image"], "meta", {})
    files = meta.get("filename_or_obj", ["subject"] * len(batch["image"]))
    files = [files] if isinstance(files, str) else list(files)
    names = []
    for path in files:
        name = os.path.basename(str(path))
        for suffix in (".nii.gz", ".nii"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        names.append(name)
    return names


def _attribute_of(subject: Mapping) -> int | None:
    value = subject.get("attribute")
    return None if value is None else int(torch.as_tensor(value).flatten()[0])


def _select(subjects: Sequence[Mapping], attribute: int | None, labelled: bool) -> list[int]:
    """Indices of the subjects of ``attribute`` (all for None) [with a label], read from the datalist entries of a
    MONAI dataset where it has them (no loading), else from the items."""
    entries = getattr(subjects, "data", subjects)
    chosen = []
    for index in range(len(subjects)):
        entry = entries[index]
        if labelled and (entry.get("label") is None or not bool(entry.get("label_present", True))):
            continue
        if attribute is not None and _attribute_of(entry) != attribute:
            continue
        chosen.append(index)
    return chosen


def _batches(subjects: Sequence[Mapping], indices: list[int], key: str, size: int, device) -> Iterator[torch.Tensor]:
    """``subjects[i][key]`` for ``i`` in ``indices``, stacked ``size`` at a time: ``(b, 1, *spatial)`` float."""
    for start in range(0, len(indices), size):
        items = [subjects[i] for i in indices[start : start + size]]
        yield torch.stack([_plain(item[key]).float() for item in items]).to(device)


@torch.no_grad()
def propagate_labels(
    network: nn.Module, subjects: Sequence[Mapping], attribute: int | None = None, batch_size: int = 32
) -> torch.Tensor | None:
    """Majority vote of the training labels pulled back into template space: ``(1, 1, *spatial)`` int, or None.

    Each labelled subject (of ``attribute``, for a conditional template) is registered from the template and its label
    map is warped by ``φ⁻¹`` (nearest neighbour); every template voxel takes the label most subjects give it.
    """
    network = _unwrap(network)
    network.eval()
    indices = _select(subjects, attribute, labelled=True)
    if not indices:
        return None
    device = network.template.base.device
    warp = Warp(mode="nearest", padding_mode="zeros")
    votes: dict[int, torch.Tensor] = {}
    images = _batches(subjects, indices, "image", batch_size, device)
    labels = _batches(subjects, indices, "label", batch_size, device)
    for image, label in zip(images, labels):
        code = None if attribute is None else torch.full((len(image),), attribute)
        _, _, inverse_ddf = _template_and_fields(network, image, code)
        pulled = warp(label, inverse_ddf).round().long()
        for value in torch.unique(pulled).tolist():
            count = (pulled == value).int().sum(dim=0, keepdim=True)
            votes[value] = count if value not in votes else votes[value] + count
    values = sorted(votes)
    counts = torch.stack([votes[v] for v in values])
    return torch.as_tensor(values, device=counts.device)[counts.argmax(dim=0)]


class TemplateEvalStep(RegistrationEvalStep):
    """Atlas-based segmentation of held-out subjects with the current template: each held-out subject is the fixed
    image, the template (and its majority-vote labels) the moving one; scored by ``RegistrationEvalStep`` (Dice of the
    warped template labels, with the unregistered template labels as the baseline)."""

    def __init__(
        self,
        train_subjects: Sequence[Mapping],
        label_ids: Sequence[int] | str | None = None,
        compute_hd95: bool = False,
    ) -> None:
        super().__init__(label_ids=label_ids, compute_hd95=compute_hd95)
        self.train_subjects = train_subjects
        self._labels: dict = {}
        self._labels_epoch: int | None = None

    def _template_labels(self, engine, attribute: int | None) -> torch.Tensor | None:
        if self._labels_epoch != engine.state.epoch:
            self._labels, self._labels_epoch = {}, engine.state.epoch
        if attribute not in self._labels:
            self._labels[attribute] = propagate_labels(engine.network, self.train_subjects, attribute)
        return self._labels[attribute]

    def __call__(self, engine, batch: Mapping) -> dict:
        template = _unwrap(engine.network).template
        template.eval()
        subject = _plain(batch["image"]).float()
        attributes = batch_attributes(batch)
        with torch.no_grad():
            images = template(attributes, batch_size=subject.shape[0]).to(subject.device)
        codes = [None] * subject.shape[0] if attributes is None else [int(a) for a in attributes]
        pair = {
            "fixed_image": batch["image"],
            "moving_image": images,
            "fixed_name": _names(batch),
            "moving_name": ["template" if code is None else f"template_{code}" for code in codes],
        }
        labels = [self._template_labels(engine, code) for code in codes]
        if "label" in batch and all(label is not None for label in labels):
            pair["fixed_label"] = batch["label"]
            pair["moving_label"] = torch.cat([label.cpu().float() for label in labels])
            if "label_present" in batch:
                pair["fixed_label_present"] = batch["label_present"]
        return super().__call__(engine, pair)


@torch.no_grad()
def mean_displacement(network: nn.Module, subjects: Sequence[Mapping], batch_size: int = 32) -> float:
    """Centrality of the template: ``mean_x |mean_s u_s(x)|`` in voxels, ``u_s`` the displacement template -> ``s``."""
    network = _unwrap(network)
    network.eval()
    total, count = None, 0
    conditional = network.template.num_attributes > 0
    for attribute in range(network.template.num_attributes) if conditional else [None]:
        indices = _select(subjects, attribute, labelled=False)
        for image in _batches(subjects, indices, "image", batch_size, network.template.base.device):
            code = None if attribute is None else torch.full((len(image),), attribute)
            _, ddf, _ = _template_and_fields(network, image, code)
            total = ddf.sum(dim=0) if total is None else total + ddf.sum(dim=0)
            count += len(image)
    mean = total / count
    return float(mean.pow(2).sum(dim=0).sqrt().mean())


def _affine_4x4(affine: torch.Tensor | np.ndarray) -> np.ndarray:
    affine = np.asarray(torch.as_tensor(affine).cpu().numpy(), dtype=np.float64)
    if affine.shape == (4, 4):
        return affine
    full = np.eye(4)
    d = affine.shape[0] - 1  # a 2D affine is 3 x 3
    full[:d, :d], full[:d, 3] = affine[:d, :d], affine[:d, d]
    return full


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: str, dtype) -> None:
    if array.ndim == 2:
        array = array[..., None]  # 2D as (H, W, 1), like the synthetic subjects
    with atomic_output(path, suffix=".nii.gz") as temporary:
        nib.save(nib.Nifti1Image(array.astype(dtype), affine), temporary)


class TemplateWriter:
    """Write the learned template as an atlas: ``template.nii.gz`` and ``template_label.nii.gz`` (majority vote), one
    pair per attribute value for a conditional template, a PNG beside the plain mean image, and a TensorBoard image.

    Written into ``output_dir`` every ``interval`` epochs and when training completes, atomically (a reader never sees
    half a template); the affine is the training grid's (that of the preprocessed first training subject), so the
    files open in ITK-SNAP/Slicer and serve as ``atlas`` of ``pair_mode: atlas`` as they are.

    Args:
        output_dir: folder for the files.
        network: the ``TemplateRegistration`` (template and registration network, for the label vote).
        train_subjects: the preprocessed training subjects (images, labels, attributes).
        interval: epochs between writes (0: only at the end).
        log_dir: TensorBoard folder (None: no TensorBoard).
    """

    def __init__(
        self,
        output_dir: str,
        network: nn.Module,
        train_subjects: Sequence[Mapping],
        interval: int = 0,
        log_dir: str | None = None,
    ) -> None:
        self.output_dir, self.network = output_dir, network
        self.train_subjects, self.interval, self.log_dir = train_subjects, int(interval), log_dir
        self._writer = None
        self._written_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def attributes(self) -> list[int | None]:
        template = _unwrap(self.network).template
        return [None] if template.num_attributes == 0 else list(range(template.num_attributes))

    def __call__(self, engine: Engine) -> None:
        if self._written_epoch == engine.state.epoch:
            return  # the last epoch's interval write already holds the final template
        self._written_epoch = engine.state.epoch
        template = _unwrap(self.network).template
        template.eval()
        first = self.train_subjects[0]
        affine = _affine_4x4(getattr(first["image"], "affine", np.eye(4)))
        mean = mean_image(self.train_subjects)[0].cpu().numpy()
        images = []
        for attribute in self.attributes():
            suffix = "" if attribute is None else f"_{attribute}"
            code = None if attribute is None else torch.tensor([attribute])
            with torch.no_grad():
                image = template(code)[0, 0].float().cpu().numpy()
            _save_nifti(image, affine, os.path.join(self.output_dir, f"template{suffix}.nii.gz"), np.float32)
            label = propagate_labels(self.network, self.train_subjects, attribute)
            if label is not None:
                label_path = os.path.join(self.output_dir, f"template{suffix}_label.nii.gz")
                _save_nifti(label[0, 0].cpu().numpy(), affine, label_path, np.int16)
            images.append((f"template{suffix}", image))
        figure = template_figure(mean, images)
        with atomic_output(os.path.join(self.output_dir, "template.png"), suffix=".png") as temporary:
            figure.savefig(temporary, dpi=100)
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            if self._writer is None:
                self._writer = SummaryWriter(log_dir=self.log_dir)
            self._writer.add_figure("template", figure, global_step=engine.state.epoch, close=False)
            self._writer.flush()
        import matplotlib.pyplot as plt

        plt.close(figure)
        logger.info(
            "template (epoch %d) written to %s: sharpness %.4f (mean image %.4f)",
            engine.state.epoch,
            self.output_dir,
            sharpness(images[0][1]),
            sharpness(mean),
        )


def template_figure(mean: np.ndarray, templates: Sequence[tuple[str, np.ndarray]]):
    """Matplotlib figure: the voxel-wise mean image, then each template (middle slice in 3D), same grey scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def middle(volume: np.ndarray) -> np.ndarray:
        volume = np.squeeze(volume)
        return volume if volume.ndim == 2 else volume[:, :, volume.shape[2] // 2]

    panels = [("mean image", mean)] + list(templates)
    figure, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6), squeeze=False)
    for axis, (title, image) in zip(axes[0], panels):
        axis.imshow(np.rot90(middle(image)), cmap="gray", vmin=0.0, vmax=max(1e-6, float(np.max(mean))))
        axis.set_title(f"{title}\nRMS |∇I| {sharpness(image):.3f}", fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    return figure
