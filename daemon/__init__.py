"""polecheck runtime: frame protocol, phantoms and feed, ROI/corners, model runner,
decode + fusion, rules, cell aggregation, publishers, PLC, metrics and the App.

This package never imports torch.
"""

__version__ = "0.1.0"
