"""The data layer below preference_datasets.py, one concept a module; imports point down only:

* rows.py: splits, errors and row validation (imports nothing of the others);
* embedded_task.py: the built-in sorting task (generator, flaws, scorer);
* sources.py: named sources, their converters and reading local files.

* encoding.py: chat formatting, tokenisation and truncation of one example, the token cache;
* loading.py: the data sets by name, the data: options, label noise, checking every split.

preference_datasets.py (above prefkd/) turns these into the batch stream a run reads; nothing
here imports it (the layers in pyproject.toml).
"""
