"""vgg: train, evaluate and use VGG image classifiers on folders of images.

The public API; heavy modules (torch, torchvision) load only when one of these names is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "VGG": "models",
    "build": "models",
    "vgg11": "models",
    "vgg11_bn": "models",
    "vgg13": "models",
    "vgg13_bn": "models",
    "vgg16": "models",
    "vgg16_bn": "models",
    "vgg19": "models",
    "vgg19_bn": "models",
    "ARCHS": "models",
    "TrainConfig": "training.config",
    "AugmentConfig": "training.augment",
    "train": "training.run",
    "lr_find": "training.run",
    "load": "predict",
    "import_keras": "keras_import",
    "load_keras": "keras_import",
    "Classifier": "predict",
    "Prediction": "predict",
    "save_model": "checkpoint",
    "load_model": "checkpoint",
    "ModelInfo": "checkpoint",
    "scan_folder": "scan",
    "UsageError": "errors",
    "format_summary": "report",
    "evaluate": "predict",
    "report": "html_report",
    "Explanation": "explain",
    "export_model": "export",
    "ExportResult": "export",
    "ServeConfig": "serve",
    "create_app": "serve",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'vgg' has no attribute {name!r}")
