"""Temperature scaling of a model file: fit T on labelled (validation) images and store it in the file.

Training calls ``calibrate_model_file`` on best.safetensors at the end of every run; prediction then divides the
logits by T (``Classifier.probabilities``). See ``metrics.fit_temperature`` for the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import load_model, save_model
from .evaluation import Outputs, collect
from .metrics import apply_temperature, expected_calibration_error, fit_temperature
from .predict import Classifier


@dataclass
class Calibration:
    temperature: float
    ece_before: float
    ece_after: float
    images: int
    outputs: Outputs | None = field(default=None, repr=False)  # the pass over the images, before calibration

    def line(self) -> str:
        return (
            f"calibration on {self.images} validation images: temperature {self.temperature:.3f}, expected "
            f"calibration error {self.ece_before:.4f} -> {self.ece_after:.4f}"
        )


def calibrate_model_file(
    path: str | Path,
    samples: Sequence[tuple[str | Path, int]],
    device: str = "auto",
    batch_size: int = 64,
    progress: bool = False,
) -> Calibration | None:
    """Fit the temperature of the model in ``path`` on ``samples`` and rewrite the file with it (atomically).

    Returns None (and leaves the file alone) when no sample could be read.
    """
    model, info = load_model(path)
    classifier = Classifier(model, dataclasses.replace(info, temperature=1.0), device=device)
    outputs = collect(classifier, samples, batch_size, progress=progress)
    if len(outputs.targets) == 0:
        return None
    temperature = fit_temperature(outputs.log_probabilities, outputs.targets)
    before = expected_calibration_error(outputs.log_probabilities.exp(), outputs.targets)
    after = expected_calibration_error(apply_temperature(outputs.log_probabilities, temperature).exp(), outputs.targets)
    save_model(path, classifier.model, dataclasses.replace(info, temperature=temperature))
    return Calibration(temperature, before, after, len(outputs.targets), outputs)
