"""The catalog: models, images and files as users have them.

``registry`` (the named models and images of a connection, kept in a directory by
``store``), ``models`` / ``model_files`` / ``weights`` / ``graph_files`` (loading a model
from torchvision, timm, a state dict, safetensors, TorchScript or ONNX), ``images`` /
``image_formats`` / ``dicom`` (reading images, bounded), ``globs`` (file patterns).
"""
