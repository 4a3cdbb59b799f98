"""Training: configuration, augmentation, schedules, the epoch loop, transfer learning, resumable state, the run.

Nothing outside this package imports it (the command line's ``train`` and the lazy public API aside): using a
model never loads training code.
"""
