"""Training scripts: copy memory (the main job), word-level language modeling, and image DEQ on digits.

    python -m train.copy_memory                 # the default main job (CPU, about 3 minutes)
    python -m train.language_model --data DIR   # Penn Treebank / WikiText-103 from local files
    python -m train.digits                      # an image DEQ on scikit-learn's 8x8 digits

All share :mod:`train.loop` (config, seeds, checkpoints, metrics, schedule, DDP). Repository
code, run from the repository root, not installed with deq_ext; see docs/training.md,
"Training", and train/README.md.
"""
