"""Networks for pneumothorax triage: a ResNet encoder with torchvision names, a U-Net and a classifier.

Plain PyTorch (torchvision, timm and segmentation-models-pytorch are not available to this project).
"""

from service.models.networks.classifier import AuxSegmentationHead, Classifier
from service.models.networks.encoder import BasicBlock, ResNetEncoder, load_encoder_weights
from service.models.networks.unet import SCSE, DecoderBlock, UNet

__all__ = [
    "SCSE",
    "AuxSegmentationHead",
    "BasicBlock",
    "Classifier",
    "DecoderBlock",
    "ResNetEncoder",
    "UNet",
    "load_encoder_weights",
]
