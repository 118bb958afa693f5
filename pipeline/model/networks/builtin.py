"""The built-in network families: importing this module registers them."""

from pipeline.model.networks import resnets  # noqa: F401
