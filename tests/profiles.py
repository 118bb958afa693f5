"""Synthetic network profiles: the balancer's and the planner's logic tested without timing."""

from __future__ import annotations

from pipeline.performance.cost import NOTHING, NetworkProfile, Piece


def synthetic_profile(block_s: list[float], block_bytes: list[int], *, batch: int = 10, head_s: float = 0.0,
                      head_bytes: int = 0, parameter_bytes: int = 0, update_s: float = 0.0,
                      output_bytes: int = 100, image_bytes: int = 30, copy_bytes_per_s: float = 1e9,
                      image_encoder: Piece = NOTHING, input_encoder: Piece = NOTHING,
                      forward_s: float = 0.0) -> NetworkProfile:
    """Blocks of the given step seconds and saved bytes at ``batch``; every head, encoder and output alike."""
    blocks = len(block_s)
    return NetworkProfile(
        batch=batch,
        blocks=[Piece(seconds, update_s, saved, parameter_bytes, forward_s=forward_s)
                for seconds, saved in zip(block_s, block_bytes)],
        heads=[Piece(head_s, update_s, head_bytes, parameter_bytes)] * blocks,
        classifier=Piece(0.0, 0.0, 0, 0),
        image_encoders=[NOTHING, *[image_encoder] * (blocks - 1)],
        input_encoders=[[NOTHING, *[input_encoder] * (blocks - 1)] for _ in range(blocks)],
        output_bytes=[output_bytes] * blocks,
        image_bytes=image_bytes,
        copy_bytes_per_s=copy_bytes_per_s,
    )
