"""InfoPro's decoder terms (Wang et al. 2021): a module with a decoder trains on
``ixx * reconstruction + ixy * head loss``, its weights interpolated over the modules."""

from __future__ import annotations

from torch import Tensor

from pipeline.config.schema import LocalConfig
from pipeline.model.decoder import ImageDecoder, reconstruction_loss


def loss_weights(local: LocalConfig, index: int) -> tuple[float, float]:
    """(ixx, ixy) of local module ``index``: linear from (ixx_1, ixy_1) to (ixx_2, ixy_2)."""
    if not local.reconstruct:
        return 0.0, 1.0
    ratio = index / (local.modules - 2) if local.modules > 2 else 0.0
    return (local.ixx_1 + ratio * (local.ixx_2 - local.ixx_1),
            local.ixy_1 + ratio * (local.ixy_2 - local.ixy_1))


def with_reconstruction(head_loss: Tensor, decoder: ImageDecoder, output: Tensor, image: Tensor,
                        weights: tuple[float, float]) -> Tensor:
    """``ixx * reconstruction + ixy * head_loss``, the decoder rebuilding ``image`` from the module's output at
    the image's size."""
    ixx, ixy = weights
    size = (image.shape[-2], image.shape[-1])
    return ixx * reconstruction_loss(decoder(output, size), decoder.target(image)) + ixy * head_loss
