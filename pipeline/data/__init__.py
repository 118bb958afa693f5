"""Datasets: file readers, per-dataset facts and the device-resident batch loader."""
