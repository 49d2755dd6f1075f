"""Padding-free packed batches (config `padding_free`) and token-budget micro-batches
(`max_tokens_per_micro_batch`): how a right-padded [N, L] batch runs through a model without a pad
token, and how a local batch is cut into micro-batches by token count.

Packing. The N sequences of a batch (their lengths are their attention masks' sums) are packed
first-fit decreasing into rows of at most `capacity` tokens (the run's max_length): several
sequences a row, each with position ids 0, 1, ..., its length - 1 and no attention mask.
transformers (masking_utils.find_packed_sequence_indices) turns restarting position ids into a
block-diagonal causal mask for sdpa and eager attention, and flash-attention kernels read them as
variable-length sequences, so no sequence sees another. It needs use_cache=False: with a cache
the detection is skipped and the sequences of a row attend to each other.

Each packed row is its own forward call ([1, its length]): rows of uneven fill in one [R, C]
tensor would need filler tokens, i.e. padding. Bounded rows keep attention's cost per row what it
is with padded rows (sdpa computes the whole [row, row] block even when the mask is
block-diagonal). Under FSDP every rank must run as many forward calls (each all-gathers the
sharded blocks): `Planner` agrees on the largest row count and the ranks with fewer rows split
their fullest rows until they have as many.

The forward's outputs are one stream [1, T, .] of the T real positions; prefkd/logits.py
(PackedLogits) lets the losses read it as the [N, L, V] logits of the padded batch, and lays only
per-token scalars back into rows.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import utils

# attention implementations that isolate packed sequences (position ids restarting, no mask)
ISOLATING = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass
class Packing:
    """How one right-padded [N, L] batch is packed.

    rows: the batch rows (sequences) of each packed row, in stream order.
    lengths: each batch row's length (its attention mask's sum).
    index: [N, L] long, the stream position of (row, position); -1 at padding."""
    rows: List[List[int]]
    lengths: List[int]
    index: torch.LongTensor

    @property
    def tokens(self) -> int:
        return int(sum(self.lengths))


def lengths_of(attention_mask: torch.Tensor) -> List[int]:
    """Each row's length; a row whose mask is not ones then zeros (right padding) is refused."""
    lengths = attention_mask.sum(-1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions < lengths.unsqueeze(-1)):
        raise ValueError("padding_free packs right-padded rows (attention mask ones, then zeros); this batch has "
                         "holes or left padding: set padding_free=false")
    return [int(n) for n in lengths.tolist()]


def first_fit_decreasing(lengths: List[int], capacity: int) -> List[List[int]]:
    """Rows of sequence indices, each summing to at most `capacity` tokens (a longer sequence gets a
    row of its own); longest first, ties in batch order, so the packing is deterministic."""
    rows: List[List[int]] = []
    fill: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] == 0:
            continue
        for r, used in enumerate(fill):
            if used + lengths[i] <= capacity:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return rows


def split_to(rows: List[List[int]], lengths: List[int], count: int) -> List[List[int]]:
    """`rows` (lists of item indices) split until there are `count` of them: the row of most
    length (sum of `lengths` of its items) among those holding more than one item is halved each
    time, its first half first. count <= number of items. The one halving rule: packed rows of
    sequences (plan), and micro-batches of examples that every FSDP rank must run as many of
    (split_sizes_to)."""
    rows = [list(r) for r in rows]
    while len(rows) < count:
        r = max((r for r in range(len(rows)) if len(rows[r]) > 1),
                key=lambda r: sum(lengths[i] for i in rows[r]), default=None)
        if r is None:
            raise ValueError(f"cannot split {len(rows)} rows of {len(lengths)} items into {count}")
        half = len(rows[r]) // 2
        rows[r:r + 1] = [rows[r][:half], rows[r][half:]]
    return rows


def plan(attention_mask: torch.Tensor, capacity: int, rows: Optional[int] = None) -> Packing:
    """The packing of a right-padded batch into rows of at most `capacity` tokens (at least
    `rows` rows when given: the count every rank agreed on)."""
    lengths = lengths_of(attention_mask)
    packed = first_fit_decreasing(lengths, max(int(capacity), max(lengths, default=1)))
    if rows is not None and rows > len(packed):
        packed = split_to(packed, lengths, rows)
    index = torch.full(attention_mask.shape, -1, dtype=torch.long)
    start = 0
    for row in packed:
        for i in row:
            index[i, :lengths[i]] = torch.arange(start, start + lengths[i])
            start += lengths[i]
    return Packing(packed, lengths, index.to(attention_mask.device))


def packed_forward(model, input_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The model's output (`.logits`, or the hidden states while the output layer is swapped,
    prefkd/logits.py) on every packed row, concatenated: [1, T, .] in stream order."""
    outs = []
    for row in packing.rows:
        ids = torch.cat([input_ids[i, :packing.lengths[i]] for i in row]).unsqueeze(0)
        pos = torch.cat([torch.arange(packing.lengths[i], device=input_ids.device) for i in row]).unsqueeze(0)
        # use_cache=False: with a cache transformers skips the packed-sequence detection
        outs.append(model(input_ids=ids, position_ids=pos, use_cache=False).logits)
    return torch.cat(outs, dim=1)


class Planner:
    """The packing of each batch a trainer's models read (config `padding_free`): one plan per
    attention mask (the policy, the reference and the teacher read the same rows), the row count
    agreed over the ranks when `sync` (FSDP: every rank runs as many forward calls)."""

    def __init__(self, enabled: bool, capacity: int, sync: bool = False, device=None):
        self.enabled, self.capacity, self.sync, self.device = bool(enabled), int(capacity), sync, device
        self.last = None  # (attention mask, its Packing): the newest plan

    def of(self, model_in: Dict[str, torch.Tensor]) -> Optional[Packing]:
        if not self.enabled:
            return None
        mask = model_in["attention_mask"]
        # Keyed by the mask tensor itself, not its values: the models of one micro-batch read the
        # same tensor (one plan), and every rank makes exactly as many plans, so the all_max below
        # runs as often on each. Equal values on one rank only (two full masks in a row) must not
        # skip a collective that another rank runs.
        if self.last is None or self.last[0] is not mask:
            packing = plan(mask, self.capacity)
            if self.sync:
                count = utils.all_max([len(packing.rows)], self.device)[0]
                packing = plan(mask, self.capacity, rows=count)
            self.last = (mask, packing)
        return self.last[1]


# ------------------------------------------------------------------ token-budget micro-batches

def batch_tokens(examples: List[List[int]], padded: bool) -> int:
    """The tokens one forward pass of these examples' sequences processes: their sum when packed,
    else their rows times the longest (the padding included)."""
    seqs = [n for e in examples for n in e]
    return len(seqs) * max(seqs, default=0) if padded else sum(seqs)


def token_budget_split(example_lengths: List[List[int]], budget: int, padded: bool) -> List[int]:
    """Cut a batch into consecutive micro-batches (in order) of at most `budget` tokens each.

    example_lengths: per example, the lengths of its sequences (chosen and rejected, or one).
    Returns the number of examples in each micro-batch; an example over the budget on its own is
    a micro-batch of one (an example is never split)."""
    sizes: List[int] = []
    current: List[List[int]] = []
    for example in example_lengths:
        if current and batch_tokens(current + [example], padded) > budget:
            sizes.append(len(current))
            current = []
        current.append(example)
    return sizes + ([len(current)] if current else [])


def split_sizes_to(sizes: List[int], count: int) -> List[int]:
    """`sizes` (examples per micro-batch) split until there are `count` micro-batches: the largest
    is halved each time (so that every rank runs as many; each stays within its budget)."""
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    rows = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    return [len(r) for r in split_to(rows, [1] * bounds[-1], count)]


@torch.no_grad()
def check_isolation(model, what: str, impl: str) -> None:
    """Refuse (before training) a model whose attention lets packed sequences see each other: a
    probe row of two sequences, the first changed, must leave the second's logits as they were
    (exactly, up to 1e-6 of their scale). Catches architectures whose attention does not read
    restarting position ids (their own mask code), whatever the attn_implementation says."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    first, second = torch.tensor([3, 5, 7, 11]) % vocab, torch.tensor([13, 17, 19]) % vocab
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
    outs = []
    was_training = model.training
    model.eval()
    try:
        for head in (first, (first + 1) % vocab):
            ids = torch.cat([head, second]).unsqueeze(0).to(device)
            outs.append(model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, 4:].float())
    finally:
        model.train(was_training)
        if callable(getattr(model, "reshard", None)):
            # FSDP2 keeps the root's parameters unsharded after a forward pass (until backward); an
            # optimizer built now must see the sharded ones
            model.reshard()
    scale = float(outs[0].abs().max()) or 1.0
    if float((outs[0] - outs[1]).abs().max()) > 1e-6 * scale:
        raise ValueError(f"padding_free=true: {what} ({type(model).__name__}, attn_implementation={impl}) lets packed "
                         "sequences attend to each other (its attention does not read restarting position ids as "
                         "separate sequences): set padding_free=false")


# ------------------------------------------------------------------ settings

FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check(cfg) -> None:
    """padding_free, max_tokens_per_micro_batch and each model's attn_implementation, refused
    with the key named before any model loads."""
    import importlib.util
    budget = cfg.get("max_tokens_per_micro_batch")
    if budget is not None and not budget >= 1:
        raise ValueError(f"max_tokens_per_micro_batch={budget!r} must be >= 1 tokens, or null (micro-batches of rows)")
    # a row as short as a cut prompt and one response token: a budget below it bounds nothing
    if budget is not None and budget <= cfg.max_prompt_length:
        raise ValueError(f"max_tokens_per_micro_batch={budget} is below one sequence (a row holds up to "
                         f"max_prompt_length={cfg.max_prompt_length} prompt tokens and a response; max_length="
                         f"{cfg.max_length}): a micro-batch holds at least one row, so the budget would not bound it; "
                         "raise it to at least max_length")
    for key in ("model", "teacher"):
        if key == "teacher" and cfg.teacher.get("name") in (None, "none"):
            continue
        impl = cfg[key].get("attn_implementation") or "sdpa"
        package = FLASH_PACKAGES.get(impl)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"{key}.attn_implementation={impl} needs the {package} package, which is not installed: "
                             "install it (a CUDA machine) or use sdpa")
        if cfg.get("padding_free") and impl not in ISOLATING:
            raise ValueError(f"padding_free=true packs several sequences into a row, and {key}.attn_implementation="
                             f"{impl} cannot keep them apart (only {', '.join(ISOLATING)} read restarting position "
                             "ids as separate sequences): use one of those or padding_free=false")
