"""SymMIM: fast symmetric (checkerboard) masked image modeling pre-training of Vision Transformers.

One installed package; its subpackages are the repository's top-level folders:

- ``symmim.core``: config schema, masks, the ViT and SymMIM/MAE model, the training step and loop,
  schedules, checkpoints, evaluation (kNN, classifier), pre-trained weights and export;
- ``symmim.kernels``: the hot-path ops (Triton kernels beside their PyTorch references) and the
  backend switch; imports nothing from ``symmim.core``;
- ``symmim.data``: DALI and PyTorch loaders, the embedded data set, data verification;
- ``symmim.launch``: the command-line entry points (``symmim-pretrain``, ``symmim-knn``, ...);
- ``symmim.benchmarks``: throughput, kernel, data-loading and time-to-accuracy benchmarks.
"""
__version__ = "0.1.0"
