"""polecheck model side: HRNet definition, phantom crop dataset, training, ONNX export.

Needs the ``train`` extra (torch, onnx, tqdm).  Imports ``daemon`` (the shared heatmap
codec and the phantom generator); ``daemon`` never imports this package.
"""
