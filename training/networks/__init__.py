"""Networks for pneumothorax triage: a ResNet encoder with torchvision names, a U-Net and a classifier.

Plain PyTorch (torchvision, timm and segmentation-models-pytorch are not available to this project).
"""

from training.networks.classifier import AuxSegmentationHead, Classifier
from training.networks.encoder import BasicBlock, ResNetEncoder, load_encoder_weights
from training.networks.export import export_onnx
from training.networks.unet import SCSE, DecoderBlock, UNet

__all__ = [
    "SCSE",
    "AuxSegmentationHead",
    "BasicBlock",
    "Classifier",
    "DecoderBlock",
    "ResNetEncoder",
    "UNet",
    "export_onnx",
    "load_encoder_weights",
]
