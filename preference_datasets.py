"""Preference data as a run reads it: collation and the batch stream
(``get_batch_iterator``, as in eric-mitchell/direct-preference-optimization) and
``run_batches``, the batches of a run's config.

What it is built on lives below, in prefkd/data/ (so prefkd's own modules use it without
importing upward): ``loading.py`` the data sets by name, the ``data:`` options and label noise;
``encoding.py`` chat formatting, tokenisation and truncation (its docstring states the rules)
and the token cache; ``embedded_task.py`` the built-in sorting task; ``sources.py`` the named
sources (hh, shp, se, dpomix, ultrafeedback, helpsteer2, deita, local); ``rows.py`` the shared
row basics. The tokenizers a model config names load in prefkd/tokenizer_facts.py.

Batching
--------
``get_batch_iterator`` forms GLOBAL batches of ``batch_size`` consecutive
examples of a (per-epoch, seeded) permutation and yields, on each rank, only
that rank's contiguous slice of ``batch_size // world_size`` examples, so the
concatenation of all ranks' batches in rank order is the global batch.  See
its docstring for the epoch / n_examples / last-batch / resume rules.
"""
import random
from typing import Dict, Iterator, List, Optional, Tuple


import utils
from prefkd.data.encoding import build_pair, encode_example, token_cache
from prefkd.data.loading import cache_dir_of, data_options, load_dataset_checked
from prefkd.data.rows import DataError
from prefkd.logprobs import IGNORE_INDEX

# ---------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------


def collate(examples: List[Dict], pad_token_id: int) -> Dict:
    """Pad each tensor key to the longest in the batch; other keys become lists.

    ``*_input_ids`` -> pad_token_id, ``*_attention_mask`` -> 0, ``*_labels`` ->
    -100.  Responses (chosen_*/rejected_*) are RIGHT-padded for teacher
    forcing; ``prompt_*`` are LEFT-padded so generation can start right after
    the last prompt token of every row.  Each key is padded on its own, so
    chosen and rejected tensors can have different lengths.
    """
    batch = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if key.endswith("_input_ids"):
            batch[key] = utils.pad_sequences(values, pad_token_id, left=key.startswith("prompt_"))
        elif key.endswith("_attention_mask"):
            batch[key] = utils.pad_sequences(values, 0, left=key.startswith("prompt_"))
        elif key.endswith("_labels"):
            batch[key] = utils.pad_sequences(values, IGNORE_INDEX, left=key.startswith("prompt_"))
        else:
            batch[key] = values
    return batch


# ---------------------------------------------------------------------------
# Batch iteration
# ---------------------------------------------------------------------------


def global_batch_indices(
    n: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    n_epochs: Optional[int],
    n_examples: Optional[int],
    world_size: int = 1,
) -> Iterator[List[int]]:
    """Plan of global batches as lists of example indices (no data touched).

    Epoch e uses ``random.Random(seed + e)`` to permute if shuffle, else the
    natural order. Batches never straddle epochs. A final partial batch is
    dropped if shuffle (training: constant batch size), else kept but trimmed
    to a multiple of world_size so every rank gets the same number of
    examples. Stops after n_epochs epochs or once at least n_examples examples
    were planned, whichever comes first; one epoch if both are None.
    """
    if n_epochs is None and n_examples is None:
        n_epochs = 1
    planned = 0
    epoch = 0
    while n_epochs is None or epoch < n_epochs:
        order = list(range(n))
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        produced = False
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < batch_size:
                if shuffle:
                    break
                idx = idx[: len(idx) - len(idx) % world_size]
                if not idx:
                    break
            yield idx
            produced = True
            planned += len(idx)
            if n_examples is not None and planned >= n_examples:
                return
        if not produced:  # too few examples for even one batch: avoid looping forever
            return
        epoch += 1


def _batch_sources(names: List[str], split: str, tokenizer, template: Optional[str], sft_mode: bool, options,
                   silent: bool, cache_dir: Optional[str], rank: int) -> Tuple[List[Tuple[str, int, Dict]], Dict]:
    """(data, caches) of get_batch_iterator: every example as (data set name, index within it,
    example), and each data set's TokenCache. Pairwise training refuses SFT-only rows."""
    data = []  # (data set name, index within it, example)
    caches = {}
    for name in names:
        examples, fingerprint = load_dataset_checked(name, split, options, silent=silent)
        if not sft_mode:
            bad = next((ex for ex in examples if ex["chosen"] is None), None)
            if bad is not None:
                raise DataError(f"data set {name!r} has SFT rows without preference pairs (e.g. {bad.get('where')}); "
                                "use it with loss=sft")
        data.extend((name, i, ex) for i, ex in enumerate(examples))
        caches[name] = token_cache(cache_dir, name, split, fingerprint, tokenizer, template, rank)
    return data, caches


def _batch_element(entry: Tuple[str, int, Dict], caches: Dict, tokenizer, template: Optional[str], sft_mode: bool,
                   max_length: int, max_prompt_length: int, truncation_mode: str) -> Dict:
    """One example of a batch: its (cached) ids, truncated by build_pair, plus what scorers read."""
    name, i, ex = entry
    ids = caches[name].get(i, lambda: encode_example(ex, tokenizer, template))
    chosen, rejected = ("sft_target", "sft_target") if sft_mode else ("chosen", "rejected")
    out = {"prompt": ids["prompt_text"], "chosen": ex[chosen], "rejected": ex[rejected]}
    out.update(build_pair(ids["prompt"], ids[chosen], ids[rejected], tokenizer.bos_token_id, max_length,
                          max_prompt_length, truncation_mode))
    out["dataset"] = name
    out["original_prompt"] = ex["prompt"]  # before the chat template: what scorers and judges read
    out["reference"] = ex["sft_target"]
    return out


def get_batch_iterator(
    names: List[str],
    tokenizer,
    split: str = "train",
    batch_size: int = 8,
    shuffle: bool = True,
    max_length: int = 512,
    max_prompt_length: int = 128,
    sft_mode: bool = False,
    n_epochs: Optional[int] = None,
    n_examples: Optional[int] = None,
    seed: int = 0,
    silent: bool = False,
    rank: int = 0,
    world_size: int = 1,
    truncation_mode: str = "keep_end",
    skip_batches: int = 0,
    options=None,
    cache_dir: Optional[str] = None,
    stats: Optional[Dict[str, int]] = None,
) -> Iterator[Dict]:
    """Yield this rank's slice of each global batch, tokenised and collated.

    * ``batch_size`` is the GLOBAL batch size; each rank gets the contiguous
      slice ``[rank*b:(rank+1)*b]`` with ``b = batch_size // world_size``
      (ValueError if it does not divide). A trimmed final eval batch of size
      p is split the same way with ``b = p // world_size``.
    * Order, epochs, n_examples and the final partial batch follow
      ``global_batch_indices``.
    * ``skip_batches=k`` skips the first k GLOBAL batches (counted across
      epochs) without tokenising them: resuming with the same arguments plus
      skip_batches continues the exact same stream.
    * ``sft_mode``: chosen AND rejected are replaced by ``sft_target`` so the
      truncation depends only on the target; use only the chosen_* keys.
    * Only this rank's examples are tokenised, lazily; with ``cache_dir`` their ids are
      kept in a TokenCache there, so the next run with the same data and tokenizer
      tokenises nothing. ``stats`` (a dict) receives the cache's hits and misses.
    * ``options``: the ``data:`` config section (data_options).
    * Each batch also carries ``dataset`` (data set names), ``original_prompt`` (the prompt
      before any chat template: a string or a message list) and ``reference`` (the SFT
      target), for scorers (prefkd/scorers.py) and judges.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    if batch_size < 1 or batch_size % world_size != 0:
        raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")

    template = data_options(options)["chat_template"]
    data, caches = _batch_sources(names, split, tokenizer, template, sft_mode, options, silent or rank != 0,
                                  cache_dir, rank)
    plan = global_batch_indices(len(data), batch_size, shuffle, seed, n_epochs, n_examples, world_size)
    try:
        for batch_idx, idx in enumerate(plan):
            if batch_idx < skip_batches:
                continue
            per_rank = len(idx) // world_size
            local = idx[rank * per_rank : (rank + 1) * per_rank]
            yield collate([_batch_element(data[i], caches, tokenizer, template, sft_mode, max_length,
                                          max_prompt_length, truncation_mode) for i in local], tokenizer.pad_token_id)
    finally:
        for cache in caches.values():
            cache.flush()
            if stats is not None:
                stats["hits"] = stats.get("hits", 0) + cache.hits
                stats["misses"] = stats.get("misses", 0) + cache.misses


def run_batches(cfg, tokenizer, spec, split: str, rank: int = 0, world_size: int = 1, skip_batches: int = 0,
                pairs: bool = False) -> Iterator[Dict]:
    """The batches a run of config `cfg` reads of `split` on process `rank` of `world_size` (the
    trainer, precompute.py and the tests read exactly these): pairs, or single targets when the
    loss's spec (loss_spec.LossSpec) trains on SFT targets (pairs=True: pairs regardless, for the
    held-out preference accuracy)."""
    train = split == "train"
    return get_batch_iterator(
        list(cfg.datasets), tokenizer, split=split,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        shuffle=train, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        sft_mode=spec.sft_targets and not pairs, n_epochs=cfg.n_epochs if train else 1,
        n_examples=cfg.n_examples if train else cfg.n_eval_examples, seed=cfg.seed, silent=True,
        rank=rank, world_size=world_size, truncation_mode=cfg.truncation_mode,
        skip_batches=skip_batches, options=cfg.get("data"), cache_dir=cache_dir_of(cfg.get("data")))
