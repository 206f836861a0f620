"""Training scripts: copy memory (the main job) and word-level language modeling.

    python -m train.copy_memory                 # the default main job (CPU, ~10 minutes)
    python -m train.language_model --data DIR   # Penn Treebank / WikiText-103 from local files

Both share :mod:`train.loop` (config, seeds, checkpoints, metrics, schedule, DDP). See the
"Training" section of the README.
"""
