"""The batch layer: what happens to a collated batch (preference_datasets.get_batch_iterator)
between the data and a model. Stacking a pair's two sides into one forward pass, cutting a
batch into micro-batches (by count, then by a token budget), and a pair's summed response
log-probs under a model. The trainer, evaluate.py, precompute.py and the benchmarks share
these, so the rows a cache stores are the rows the trainer reads.
"""
from typing import Callable, Dict, List

import torch

import utils
from prefkd import packing
from prefkd.logprobs import IGNORE_INDEX, response_mask, sequence_logps, token_logps


def concatenated_inputs(batch: Dict, pairwise: bool, pad_id: int) -> Dict[str, torch.Tensor]:
    """Stack chosen and rejected into one [2B, L] batch (chosen rows first) so each model runs
    one forward pass; the shorter side's input_ids are padded with the tokenizer's `pad_id`
    (tokenizer_facts.pad_id). Not pairwise: the chosen side's [B, L] tensors as they are."""
    if not pairwise:
        return {k: batch[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "labels")}
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    # The real pad id, never 0: a reward model's head reads each row at its last token that is not
    # the pad id (transformers ignores the mask there), so a 0 would move the shorter side's score
    # onto a padding position (prefkd/tokenizer_facts.py).
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.cat([utils.pad_to_length(batch[f"chosen_{k}"], length, p),
                          utils.pad_to_length(batch[f"rejected_{k}"], length, p)], dim=0)
            for k, p in pads.items()}


def split_batch(batch: Dict, n: int) -> List[Dict]:
    """Split a local batch into n micro-batches (gradient accumulation)."""
    size = len(batch["prompt"])
    step = size // n
    return [{k: v[i * step:(i + 1) * step] for k, v in batch.items()} for i in range(n)]


def split_by_tokens(batch: Dict, budget: int, padded: bool, pairwise: bool, sync_device=None) -> List[Dict]:
    """Cut a micro-batch into consecutive ones of at most `budget` tokens (config
    max_tokens_per_micro_batch; prefkd/packing.py): padded, a part's rows times its longest; packed,
    its tokens. Each part's responses are trimmed to its own longest row (right padding only, so
    nothing changes). `sync_device`: every rank agrees on the number of parts (FSDP)."""
    sides = ("chosen", "rejected") if pairwise else ("chosen",)
    lengths = [[int(n) for n in row] for row in zip(*(batch[f"{s}_attention_mask"].sum(-1).tolist() for s in sides))]
    sizes = packing.token_budget_split(lengths, int(budget), padded)
    if sync_device is not None:
        sizes = packing.split_sizes_to(sizes, utils.all_max([len(sizes)], sync_device)[0])
    parts, start = [], 0
    for size in sizes:
        part = {k: v[start:start + size] for k, v in batch.items()}
        for s in ("chosen", "rejected"):
            if f"{s}_attention_mask" in part:
                width = max(1, int(part[f"{s}_attention_mask"].sum(-1).max()))
                for k in ("input_ids", "attention_mask", "labels"):
                    part[f"{s}_{k}"] = part[f"{s}_{k}"][:, :width]
        parts.append(part)
        start += size
    return parts


@torch.no_grad()
def pair_logps(batch: Dict, logits_of: Callable[[Dict], torch.Tensor], pad_id: int, device=None) -> torch.Tensor:
    """[2B] summed response log-probs of a pair batch, chosen rows first, then rejected.

    logits_of(model_in) -> [2B, L, V] logits (or logits.LazyLogits), model_in holding
    input_ids and attention_mask; `device`: where the stacked inputs go first."""
    inputs = concatenated_inputs(batch, True, pad_id)
    if device is not None:
        inputs = utils.move_batch(inputs, device)
    logits = logits_of({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
    return sequence_logps(token_logps(logits, inputs["labels"]), response_mask(inputs["labels"]))
