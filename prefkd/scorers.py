"""Task scorers: how a generated completion is scored on a data set with checkable answers.

A scorer is any Python callable

    score(prompt, completion) -> {name: float, ...}

named in the config as ``data.scorer=<module>:<function>`` (the module importable from the
working directory or ``sys.path``) or ``data.scorer=<path/to/file.py>:<function>``.

* ``prompt`` is the ORIGINAL prompt of the example, before any chat template: a string for
  plain-text data (``"sort 5281="``), or for conversational data the list of messages
  ``[{"role": "user", "content": ...}, ...]`` that precede the generated assistant turn.
* ``completion`` is the model's greedy continuation, decoded with special tokens skipped
  (for a chat model: the assistant turn's text).
* The result maps score names to numbers; every call must return the same names. Each
  name is logged as ``task_eval/<name>`` during training (``sample_during_eval=true``),
  reported by evaluate.py as ``task_<name>`` and becomes a column of report.py's table.

``data.scorer: null`` gives every data set its default: the embedded sorting task's
checker (``prefkd.data.embedded_task:score_answer``, scores ``exact`` and ``partial``); other
data sets have none. A ``data.scorer`` string applies to every data set of the run.
"""
import functools
import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from typing import Callable, Dict, List, Mapping, Optional

# Data sets that ship a scorer; it is an ordinary spec, replaced by data.scorer.
DEFAULT_SCORERS = {"embedded": "prefkd.data.embedded_task:score_answer"}


class ScorerError(ValueError):
    """A scorer spec that cannot be loaded, or a scorer that misbehaves; names data.scorer."""


@functools.lru_cache(maxsize=None)
def _load_callable(spec: str) -> Callable:
    if not isinstance(spec, str) or ":" not in spec.strip(":") or spec.rsplit(":", 1)[1] == "":
        raise ScorerError(f"data.scorer={spec!r}: expected '<module>:<function>' (importable from the working "
                          "directory or sys.path) or '<path/to/file.py>:<function>'")
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise ScorerError(f"data.scorer={spec!r}: no such file {path}")
        name = "_scorer_" + re.sub(r"\W", "_", path)
        try:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's module failed to import: say which key names it
            raise ScorerError(f"data.scorer={spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # `python train.py` puts the script's folder first, not the cwd
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ScorerError(f"data.scorer={spec!r}: cannot import module {target!r} ({type(e).__name__}: {e}); "
                              "put it in the working directory or on PYTHONPATH, or give a file path "
                              "'path/to/file.py:function'") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ScorerError(f"data.scorer={spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ScorerError(f"data.scorer={spec!r}: {attr} is a {type(obj).__name__}, not a callable "
                          "score(prompt, completion) -> {name: float}")
    return obj


class Scorer:
    """A loaded scorer: calls the function and checks what it returns."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = _load_callable(spec)
        self.names: Optional[List[str]] = None

    def __call__(self, prompt, completion: str) -> Dict[str, float]:
        try:
            out = self.fn(prompt, completion)
        except Exception as e:
            raise ScorerError(f"data.scorer={self.spec!r} raised {type(e).__name__}: {e} "
                              f"(prompt {str(prompt)[:80]!r}, completion {completion[:80]!r})") from e
        if not isinstance(out, Mapping) or not out:
            raise ScorerError(f"data.scorer={self.spec!r} returned {type(out).__name__} {str(out)[:80]}; "
                              "it must return a non-empty dict {name: float}")
        scores = {}
        for k, v in out.items():
            if not isinstance(k, str) or not k or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise ScorerError(f"data.scorer={self.spec!r} returned {k!r}: {v!r}; every score must be a name "
                                  "(str) mapped to a finite number")
            scores[k] = float(v)
        names = sorted(scores)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ScorerError(f"data.scorer={self.spec!r} returned the scores {names}, earlier {self.names}: "
                              "every call must return the same names")
        return scores


class ScorerSet:
    """The scorer of each data set of a run (None where it has none)."""

    def __init__(self, datasets: List[str], spec: Optional[str] = None):
        loaded: Dict[str, Scorer] = {}
        self.by_dataset: Dict[str, Optional[Scorer]] = {}
        for name in datasets:
            s = spec or DEFAULT_SCORERS.get(name)
            if s and s not in loaded:
                loaded[s] = Scorer(s)
            self.by_dataset[name] = loaded.get(s) if s else None

    def __call__(self, dataset: str, prompt, completion: str) -> Optional[Dict[str, float]]:
        scorer = self.by_dataset.get(dataset)
        return None if scorer is None else scorer(prompt, completion)

    def common(self) -> Optional[Scorer]:
        """The one scorer every data set shares, or None (no scorer, or a mix). Training-time
        sampling scores only then, so every rank logs the same number of scores."""
        scorers = {id(s): s for s in self.by_dataset.values()}
        return next(iter(scorers.values())) if len(scorers) == 1 else None

    def specs(self) -> Dict[str, Optional[str]]:
        return {name: (s.spec if s else None) for name, s in self.by_dataset.items()}


def scorer_spec(options) -> Optional[str]:
    """data.scorer of a `data:` section (OmegaConf node or dict)."""
    if options is None:
        return None
    value = options.get("scorer") if hasattr(options, "get") else None
    if value is not None and not isinstance(value, str):
        raise ScorerError(f"data.scorer={value!r}: expected a string '<module>:<function>' or "
                          "'<path/to/file.py>:<function>'")
    return value or None


def for_config(datasets, options=None) -> ScorerSet:
    """The ScorerSet of a run: `datasets` and its `data:` section."""
    return ScorerSet(list(datasets), scorer_spec(options))
