"""Network families: the registry (registry.py), the block-list base (base.py), the built-ins."""
