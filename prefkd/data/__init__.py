"""The data layer below preference_datasets.py, one concept a module; imports point down only:

* rows.py: splits, errors and row validation (imports nothing of the others);
* embedded_task.py: the built-in sorting task (generator, flaws, scorer);
* sources.py: named sources, their converters and reading local files.

preference_datasets.py keeps the registry, chat formatting, tokenising, the token cache,
collation and batching; nothing here imports it.
"""
