"""ONNX export of the networks with a dynamic batch axis.

Why ONNX: the serving install runs models through ONNX Runtime and must not depend on torch.

Why the TorchScript-based exporter (`dynamo=False`): for these purely convolutional graphs it produces the
same operators as the dynamo exporter, is several times faster (which matters for the CPU-only tests) and
takes `dynamic_axes` directly. Height and width are fixed at export time (the service resizes to the
training resolution anyway); only the batch axis is dynamic.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from training.networks.classifier import Classifier
from training.networks.encoder import OUTPUT_STRIDE, require_int
from training.networks.unet import UNet

INPUT_NAME = "image"
OPSET = 17


class _LogitAndMask(nn.Module):
    """Adapter exporting a multi-task classifier's two outputs (logit, mask_logits)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier.forward_with_mask(image)


def export_onnx(
    model: UNet | Classifier,
    path: str | os.PathLike[str],
    image_size: int | tuple[int, int],
    *,
    include_mask: bool = False,
    opset: int = OPSET,
) -> list[str]:
    """Export `model` (in eval mode) to a self-contained ONNX file; return the output names.

    Input: ``image`` float32 (batch, in_channels, H, W). Outputs:

    * UNet: ``mask_logits`` (batch, 1, H, W);
    * Classifier: ``logit`` (batch,), plus ``mask_logits`` when ``include_mask=True`` (needs the auxiliary
      head; useful for inspecting what the classifier looked at, never needed for triage).

    The model is switched to eval mode (BatchNorm running statistics, no dropout) and left in it.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    for name, side in (("height", height), ("width", width)):
        require_int(f"image {name}", side, OUTPUT_STRIDE)
        if side % OUTPUT_STRIDE:
            raise ValueError(f"image {name} must be a multiple of {OUTPUT_STRIDE}, got {side}")
    require_int("opset", opset, 17)
    if isinstance(model, UNet):
        module: nn.Module = model
        outputs = ["mask_logits"]
    elif isinstance(model, Classifier):
        if include_mask and model.aux_head is None:
            raise ValueError("include_mask=True needs a Classifier built with aux_segmentation=True")
        module = _LogitAndMask(model) if include_mask else model
        outputs = ["logit", "mask_logits"] if include_mask else ["logit"]
    else:
        raise ValueError(f"model must be a UNet or a Classifier, got {type(model).__name__}")
    if include_mask and isinstance(model, UNet):
        raise ValueError("include_mask applies to a Classifier only; a UNet always outputs mask_logits")
    # Eval mode on the exported module itself (not only `model`): the exporter restores the top module's
    # mode afterwards, and a wrapper left in train mode would switch `model` back to training.
    module.eval()
    example = torch.zeros(2, model.encoder.in_channels, height, width)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call; the export is still exact.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            os.fspath(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    return outputs
