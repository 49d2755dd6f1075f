"""Supporting modules of the framework, one concept each (the spine - train.py, trainers.py,
losses.py, preference_datasets.py, utils.py - and the commands stay at the top level)."""
