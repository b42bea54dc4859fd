"""Networks for pneumothorax triage: a ResNet encoder with torchvision names, a U-Net and a classifier.

Plain PyTorch (torchvision, timm and segmentation-models-pytorch are not available to this project).
"""

from service.models.networks.classifier import AuxSegmentationHead, Classifier
from service.models.networks.encoder import BasicBlock, Bottleneck, ResNetEncoder
from service.models.networks.unet import SCSE, DecoderBlock, UNet
from service.models.networks.weights import load_encoder_weights

__all__ = [
    "SCSE",
    "AuxSegmentationHead",
    "BasicBlock",
    "Bottleneck",
    "Classifier",
    "DecoderBlock",
    "ResNetEncoder",
    "UNet",
    "load_encoder_weights",
]
