"""The performance model: what a network's pieces cost in seconds and bytes, measured and predicted."""
