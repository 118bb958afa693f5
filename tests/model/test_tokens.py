"""pipeline.model.tokens: heads, InfoPro's decoder and ContSup's encoders for token and vector features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import BadInput
from pipeline.model.decoder import ImageDecoder
from pipeline.model.tokens import (
    PatchEncoder,
    TokenDecoder,
    TokenHead,
    TokenProjection,
    VectorHead,
    patch_side,
    token_context_encoder,
)


@pytest.mark.parametrize(("tokens", "image", "side"), [
    (64, (3, 32, 32), 4), (16, (1, 32, 32), 8), (6, (2, 8, 12), 4), (24, (2, 8, 12), 2),
    (10, (1, 32, 32), None),  # 32*32/10 is no square
    (9, (1, 6, 24), None),  # p = 4 by area, but 4 does not divide 6
    (2, (1, 4, 4), None),  # p = 2 by area (rounded down), but a 2x2 grid is 4 tokens
])
def test_patch_side(tokens, image, side):
    assert patch_side(tokens, image) == side


def test_token_head_pools_the_tokens_and_vector_head_maps_vectors():
    torch.manual_seed(0)
    head = TokenHead((16, 24), out=10, hidden=32)
    tokens = torch.randn(3, 16, 24)
    logits = head(tokens)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(head(tokens[:, torch.randperm(16)]), logits)  # a mean: the order does not count
    assert VectorHead((24,), out=7, hidden=32)(torch.randn(3, 24)).shape == (3, 7)
    with pytest.raises(BadInput, match=r"^a token head takes tokens, not vectors of shape \[24\]"):
        TokenHead((24,), out=10, hidden=32)
    with pytest.raises(BadInput, match=r"^a vector head takes vectors, not tokens of shape \[16, 24\]"):
        VectorHead((16, 24), out=10, hidden=32)


def image_of_token_indices(decoder: TokenDecoder, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """What the decoder rebuilds when token i is the number i and pixel (c, y, x) of a patch is
    1000 * token + its place c*p*p + y*p + x in the linear's output."""
    p = decoder.patch
    with torch.no_grad():
        decoder.pixels.weight.fill_(1000.0)
        decoder.pixels.bias.copy_(torch.arange(channels * p * p, dtype=torch.float32))
    features = torch.arange(grid[0] * grid[1], dtype=torch.float32).view(1, -1, 1)
    return decoder(features)[0]


def test_token_decoder_puts_token_i_into_patch_i_in_row_order():
    decoder = TokenDecoder((6, 1), (2, 8, 12), mean=(0.0, 0.0), std=(1.0, 1.0))
    assert isinstance(decoder, ImageDecoder) and decoder.patch == 4
    image = image_of_token_indices(decoder, (2, 3), 2)
    assert image.shape == (2, 8, 12)
    for c in range(2):
        for y in range(8):
            for x in range(12):
                token = (y // 4) * 3 + x // 4  # a 2-row, 3-column grid: a transposed fold would misplace these
                assert image[c, y, x].item() == 1000 * token + c * 16 + (y % 4) * 4 + x % 4


def test_token_decoder_target_and_refusals():
    decoder = TokenDecoder((64, 192), (3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert decoder(torch.randn(2, 64, 192)).shape == (2, 3, 32, 32)
    image = torch.tensor([-4.0, 0.0, 1.0, 4.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert decoder.target(image)[0, 0, 0].tolist() == [0.0, 0.5, 0.75, 1.0]
    with pytest.raises(BadInput, match=r"^InfoPro's decoder cannot rebuild a 1x32x32 image from tokens of shape "
                                       r"\[10, 8\]: .*set local.reconstruct = false"):
        TokenDecoder((10, 8), (1, 32, 32), mean=(0.0,), std=(1.0,))
    with pytest.raises(BadInput, match=r"cannot fold 64 tokens of 4x4 pixels into a 36x32 image"):
        decoder(torch.randn(1, 64, 192), (36, 32))


def test_patch_encoder_embeds_patch_i_into_token_i():
    torch.manual_seed(0)
    encoder = PatchEncoder((1, 8, 12), (6, 5))
    image = torch.zeros(2, 1, 8, 12)
    assert encoder(image).shape == (2, 6, 5)
    image[:, :, 4:8, 4:8] = torch.randn(2, 1, 4, 4)  # patch (row 1, column 1) of a 2x3 grid: token 4
    tokens = encoder(image)
    blank = encoder(torch.zeros(2, 1, 8, 12))
    changed = [i for i in range(6) if not torch.equal(tokens[:, i], blank[:, i])]
    assert changed == [4]


def test_projection_and_the_context_encoder_for_tokens():
    assert TokenProjection((64, 96), (64, 192))(torch.randn(2, 64, 96)).shape == (2, 64, 192)
    assert isinstance(token_context_encoder((3, 32, 32), (64, 192)), PatchEncoder)
    assert isinstance(token_context_encoder((64, 96), (64, 192)), TokenProjection)
    encoder = token_context_encoder((3, 32, 32), (16, 48))
    assert isinstance(encoder, PatchEncoder) and isinstance(encoder.embed, nn.Conv2d)
    assert encoder.embed.kernel_size == encoder.embed.stride == (8, 8)


@pytest.mark.parametrize(("source", "target", "message"), [
    ((64, 96), (16, 192), r"^ContSup's token projection cannot turn tokens of shape \[64, 96\] into tokens of shape "
                          r"\[16, 192\]: "),
    ((3, 32, 32), (10, 192), r"^ContSup's patch encoder cannot turn maps of shape \[3, 32, 32\] into tokens of shape "
                             r"\[10, 192\]: "),
    ((3, 32, 32), (192,), r"^ContSup cannot add maps of shape \[3, 32, 32\] to vectors of shape \[192\]: "),
    ((192,), (64, 192), r"^ContSup cannot add vectors of shape \[192\] to tokens of shape \[64, 192\]: "),
])
def test_what_cannot_fit_is_one_line_bad_input(source, target, message):
    with pytest.raises(BadInput, match=message + r".*set local.context = 'R0'") as err:
        token_context_encoder(source, target)
    assert "\n" not in str(err.value)
