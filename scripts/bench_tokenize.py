"""Tokenisation cost, first run vs cached run, measured in one process.

    python scripts/bench_tokenize.py            # 10k embedded pairs + 10k chat pairs (local jsonl)

For each data set: one pass over 10k training pairs with an empty cache (tokenises and
writes the cache), a second pass over the same pairs (reads the cache, tokenises nothing),
and a pass with the cache off, each timed end to end (loading, formatting, tokenising,
truncating, collating). Prints seconds and the first/cached ratio.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import preference_datasets as pdata
from prefkd import tokenizer_facts
from prefkd.data import loading as data_loading

N = 10000


def one_pass(names, tok, cache_dir, options):
    stats = {}
    t0 = time.perf_counter()
    n = 0
    for batch in pdata.get_batch_iterator(names, tok, split="train", batch_size=100, shuffle=True, max_length=256,
                                          max_prompt_length=128, n_examples=N, options=options, cache_dir=cache_dir,
                                          stats=stats, silent=True):
        n += len(batch["prompt"])
    return time.perf_counter() - t0, n, stats


def chat_file(root):
    d = os.path.join(root, "chat")
    os.makedirs(d)
    for split, n in (("train", N), ("test", 10)):
        with open(os.path.join(d, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                p = [{"role": "system", "content": "You sort digits."},
                     {"role": "user", "content": f"Please sort {i * 7919 % 1000003} and explain briefly."}]
                f.write(json.dumps({"chosen": p + [{"role": "assistant", "content": f"Sorted: {sorted(str(i))}."}],
                                    "rejected": p + [{"role": "assistant", "content": f"No idea about {i}."}]}) + "\n")
    return d


def main():
    tok = tokenizer_facts.get_tokenizer("embedded")
    root = tempfile.mkdtemp()
    try:
        cases = [("embedded (raw text)", ["embedded"], None),
                 ("chat pairs (local jsonl, chat template)", ["local"], {"local": {"path": chat_file(root)}})]
        print(f"{N} training pairs per data set, batch 100, embedded tokenizer")
        for label, names, options in cases:
            cache = os.path.join(root, "cache-" + names[0])
            if options:  # load once, so the passes time tokenisation and not the JSON reading
                data_loading.get_dataset(names[0], "train", silent=True, options=options)
            t_first, n, s1 = one_pass(names, tok, cache, options)
            t_cached, _, s2 = one_pass(names, tok, cache, options)
            t_off, _, _ = one_pass(names, tok, None, options)
            print(f"{label}: first {t_first:.2f} s (tokenised {s1['misses']}), cached {t_cached:.2f} s "
                  f"(tokenised {s2['misses']}), no cache {t_off:.2f} s; first/cached = {t_first / t_cached:.1f}x "
                  f"over {n} examples")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # no options: --help only
    main()
