"""Training: targets from labels, data sets at the model's mpp, augmentation, masked losses and the loop.

``histopan train CONFIG.yaml`` (see :mod:`histopan.cli`) reads a :class:`~.config.TrainConfig` and calls
:func:`~.loop.train`, which writes a run folder and, at the end, a model folder with tuned thresholds.
Submodules are imported on use so ``import histopan.training`` stays light.
"""
