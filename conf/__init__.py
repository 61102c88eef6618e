"""The Hydra configuration, shipped in the wheel as the package data ``experiments.conf``."""
