"""The tutorial's VGG16 in Keras, timed the way bench_speed.py times `vgg`: training and inference images/s.

The model is the tutorial's: 13 3x3 'same' convolutions with ReLU in five blocks, each closed by a 2x2 max-pool,
Flatten, Dense 4096, Dense 4096, softmax; trained with Adam (1e-3) and categorical cross-entropy, channels-last
float32 images (Keras's default layout and precision). Synthetic data, so only the framework and the model are
measured. It runs in its own interpreter (bench_speed.py calls it with KERAS_PYTHON or the current one) so that
TensorFlow and PyTorch never share a process or a thread pool.

Usage: python benchmarks/keras_vgg16.py SIZE BATCH STEPS   (prints one JSON line: train and inference images/s)
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def tutorial_vgg16(size: int, classes: int) -> keras.Model:
    model = keras.Sequential([keras.Input((size, size, 3))])
    for filters, convs in BLOCKS:
        for _ in range(convs):
            model.add(layers.Conv2D(filters, 3, padding="same", activation="relu"))
        model.add(layers.MaxPooling2D(2, strides=2))
    model.add(layers.Flatten())
    model.add(layers.Dense(4096, activation="relu"))
    model.add(layers.Dense(4096, activation="relu"))
    model.add(layers.Dense(classes, activation="softmax"))
    return model


def main() -> int:
    size, batch, steps = (int(a) for a in sys.argv[1:4])
    classes = 10
    model = tutorial_vgg16(size, classes)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch)]
    model.train_on_batch(x, y)  # builds and compiles the training step
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    train = batch * steps / (time.perf_counter() - start)
    model.predict_on_batch(x)
    start = time.perf_counter()
    for _ in range(steps):
        model.predict_on_batch(x)
    infer = batch * steps / (time.perf_counter() - start)
    backend = keras.backend.backend()
    print(json.dumps({"train": train, "infer": infer, "keras": keras.__version__, "backend": backend}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
