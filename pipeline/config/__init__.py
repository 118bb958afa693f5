"""Typed experiment configuration: the schema (schema.py), reading a TOML file with ``--set`` overrides
(loading.py), every rule about values (validation.py) and the cut notation (cuts.py)."""
