"""Local methods: the registry (registry.py) and the built-ins, which importing this package registers."""

from pipeline.model.methods import contrast, predsim, softmax  # noqa: F401
