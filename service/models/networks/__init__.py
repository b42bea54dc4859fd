"""Networks for pneumothorax triage: ResNet / SE-ResNeXt encoders with torchvision's and timm's names, a U-Net,
a classifier, and ensembles of either as one network.

Plain PyTorch (torchvision, timm and segmentation-models-pytorch are not available to this project).
"""

from service.models.networks.classifier import AuxSegmentationHead, Classifier
from service.models.networks.encoder import (
    BasicBlock,
    Bottleneck,
    ResNetEncoder,
    SqueezeExcite,
)
from service.models.networks.ensemble import (
    ClassifierEnsemble,
    UNetEnsemble,
    mean_probability_logit,
)
from service.models.networks.unet import SCSE, DecoderBlock, UNet
from service.models.networks.weights import load_encoder_weights

__all__ = [
    "SCSE",
    "AuxSegmentationHead",
    "BasicBlock",
    "Bottleneck",
    "Classifier",
    "ClassifierEnsemble",
    "DecoderBlock",
    "ResNetEncoder",
    "SqueezeExcite",
    "UNet",
    "UNetEnsemble",
    "load_encoder_weights",
    "mean_probability_logit",
]
