"""Converters between a clip-trainer model folder and other formats, apart from the training core: ONNX graphs out
(`to_onnx`, `clip-trainer export-onnx`), open_clip checkpoints in (`from_open_clip`, `clip-trainer import-open-clip`) and
out (`to_open_clip`, `clip-trainer export-open-clip`), both through one table of weight names (`open_clip_weights`).
"""
