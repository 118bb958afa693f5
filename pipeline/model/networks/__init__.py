"""Network families: what a family is (family.py), the lookup (registry.py), the block-list base (base.py), the
built-ins."""
