"""The two models of the cascade as trainer `Task`s: their networks, losses and validation metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from service.cascade.preprocess import resize
from service.models.input_spec import InputSpec
from service.models.networks import Classifier, UNet, load_encoder_weights
from training import losses, metrics
from training.config import ModelConfig
from training.datasets import RadiographDataset
from training.trainer import Task


def input_spec(config: ModelConfig) -> InputSpec:
    return InputSpec(size=config.input.size, mean=config.input.mean, std=config.input.std,
                     channels=config.input.channels)


def build_classifier(config: ModelConfig) -> Classifier:
    net = config.network
    model = Classifier(encoder_depth=net.encoder_depth, in_channels=config.input.channels, width=net.width,
                       aux_segmentation=net.aux_segmentation, encoder_kind=net.encoder)
    if net.encoder_weights:
        load_encoder_weights(model.encoder, net.encoder_weights)
    return model


def build_segmenter(config: ModelConfig) -> UNet:
    net = config.network
    model = UNet(encoder_depth=net.encoder_depth, in_channels=config.input.channels, width=net.width, scse=net.scse,
                 decoder_blocks=net.decoder_blocks, encoder_kind=net.encoder)
    if net.encoder_weights:
        load_encoder_weights(model.encoder, net.encoder_weights)
    return model


@torch.no_grad()
def predict(model: nn.Module, dataset: RadiographDataset, batch_size: int = 32, hflip: bool = False) -> np.ndarray:
    """Model outputs (sigmoid) over a dataset, in order; with `hflip`, the mean with the mirrored pass."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))]).to(device)
        out = torch.sigmoid(model(images))
        if hflip:
            flipped = torch.sigmoid(model(images.flip(-1)))
            out = (out + (flipped.flip(-1) if out.ndim == 4 else flipped)) / 2
        outputs.append(out.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def classifier_task(config: ModelConfig, validation: RadiographDataset) -> Task:
    """BCE (or focal / F-beta) on the image label, plus the auxiliary segmentation loss where the network has
    the head: small, faint lesions give an image-level label too little signal to learn from alone."""
    kind, aux_weight = config.loss.kind, config.loss.aux_weight
    auxiliary = config.network.aux_segmentation

    def loss(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if auxiliary:
            logit, mask_logits = model.forward_with_mask(images)
            return losses.multitask_loss(logit, labels, mask_logits, masks, aux_weight=aux_weight, kind=kind)
        return losses.classification_loss(model(images), labels, kind=kind)

    def validate(model: nn.Module) -> float:
        scores = predict(model, validation)
        return metrics.roc_auc(scores, validation.cached.labels[validation.indices])

    return Task("classifier", loss, validate, "AUC")


def segmenter_task(config: ModelConfig, validation: RadiographDataset) -> Task:
    """Dice + BCE (+ focal), weights from the config; validated by SIIM mean Dice at 0.5 over the validation
    films given (all of them: empty-empty counts 1), because the segmenter trains on negatives too and must
    learn to leave them empty; Dice on positives alone would reward painting every film."""
    weights = tuple(config.loss.weights)

    def loss(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return losses.segmentation_loss(model(images), masks, weights=weights)

    def validate(model: nn.Module) -> float:
        probabilities = predict(model, validation)[:, 0]
        truths = np.asarray(validation.cached.masks)[validation.indices] > 127
        truths = masks_at_size(truths, probabilities.shape[-1])
        return metrics.mean_dice(list(probabilities > 0.5), list(truths))

    return Task("segmenter", loss, validate, "SIIM Dice")


def masks_at_size(masks: np.ndarray, size: int) -> np.ndarray:
    """Boolean (N, H, W) masks resized to (N, size, size) by coverage > 0.5 (the cache may be larger)."""
    if masks.shape[-1] == size:
        return masks
    return np.stack([resize(m.astype(np.float32), size, size) > 0.5 for m in masks])

