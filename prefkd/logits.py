"""The chunked output layer: vocabulary-sized [N, L, V] tensors that are never materialised whole.

With `output_chunking: true` (the default) the trainer hands the losses `LazyLogits` (a model's
final hidden states [N, L, H] and output weight [V, H]) in place of every [N, L, V] logits
tensor; `chunked` projects one chunk of positions at a time inside the chunk functions
(recomputed in backward), so no [N, L, V] tensor of any model exists. `output_logits` is the
one place a model's forward pass is turned into logits or a `LazyLogits` (the output-head swap).

Vocabulary-sized work (log-softmax, KL, logsumexp, top-k) runs in chunks along the sequence,
sized so that a chunk holds about CHUNK_ELEMENTS floats: with a 128k vocabulary the [2B, L, V]
fp32 temporaries are what run out of memory first. Where the chunk needs the policy's gradient
it is recomputed in backward (activation checkpointing), so autograd does not keep a full-size
log-softmax alive either.
"""
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from prefkd.packing import packed_forward

CHUNK_ELEMENTS = 1 << 25


def chunk_positions(n_rows: int, vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, n_rows * vocab))


class LazyLogits:
    """A vocabulary-sized [N, L, V] tensor that is never materialised whole (the chunked output
    layer, config key `output_chunking`).

    A leaf is a model's output layer applied to its final hidden states,

        logits = hidden @ weight.T (+ bias)      hidden [N, L, H], weight [V, H], bias [V] or None

    and a node applies a position-wise function to the chunks of its children
    (``map``: the teacher's log-softmax; ``combine``: ADPA's advantage, a difference of two
    models' log-softmaxes). ``chunked`` slices it along the sequence and projects each slice
    inside its (checkpointed) chunk function, so at most one chunk's [N, c, V] logits exist;
    the losses read it exactly as they read a logits tensor, through ``chunked`` and
    ``token_logps``. Gradients reach `hidden` and `weight` (a tied embedding included) through
    ordinary autograd.

    Supported: ``shape``, ``t[rows, positions]`` with slices on the first two dims only,
    ``detach()``, ``map(fn)``, ``combine(fn, *parts)`` and ``materialize()`` (the full tensor,
    for tests and small inputs)."""

    def __init__(self, hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, *, fn: Optional[Callable] = None,
                 children: Tuple["LazyLogits", ...] = ()):
        if fn is None:
            if hidden is None or weight is None or hidden.dim() != 3 or weight.dim() != 2 \
                    or hidden.shape[-1] != weight.shape[-1]:
                raise ValueError("LazyLogits needs hidden [N, L, H] and weight [V, H]")
        elif not children:
            raise ValueError("a LazyLogits node needs children")
        self.hidden, self.weight, self.bias, self.fn, self.children = hidden, weight, bias, fn, tuple(children)

    @property
    def shape(self) -> torch.Size:
        if self.fn is None:
            return torch.Size((*self.hidden.shape[:2], self.weight.shape[0]))
        return self.children[0].shape

    @property
    def requires_grad(self) -> bool:
        if self.fn is None:
            return any(t is not None and t.requires_grad for t in (self.hidden, self.weight, self.bias))
        return any(c.requires_grad for c in self.children)

    def __getitem__(self, idx) -> "LazyLogits":
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > 2 or not all(isinstance(i, slice) for i in idx):
            raise IndexError(f"LazyLogits takes slices of its rows and positions only, got {idx!r}")
        if self.fn is None:
            return LazyLogits(self.hidden[idx], self.weight, self.bias)
        return LazyLogits(fn=self.fn, children=tuple(c[idx] for c in self.children))

    def detach(self) -> "LazyLogits":
        if self.fn is None:
            return LazyLogits(self.hidden.detach(), self.weight.detach(),
                              None if self.bias is None else self.bias.detach())
        return LazyLogits(fn=self.fn, children=tuple(c.detach() for c in self.children))

    def map(self, fn: Callable) -> "LazyLogits":
        """fn([N, c, V] chunk) -> [N, c, V], applied lazily."""
        return LazyLogits(fn=fn, children=(self,))

    @staticmethod
    def combine(fn: Callable, *parts: "LazyLogits") -> "LazyLogits":
        """fn(chunk of parts[0], chunk of parts[1], ...) -> [N, c, V], applied lazily."""
        if parts and all(isinstance(p, PackedLogits) for p in parts):
            return PackedLogits.combine_packed(fn, *parts)
        return LazyLogits(fn=fn, children=parts)

    def materialize(self) -> torch.Tensor:
        if self.fn is None:
            return F.linear(self.hidden, self.weight, self.bias)
        return self.fn(*(c.materialize() for c in self.children))


Logits = Union[torch.Tensor, LazyLogits]


class PackedLogits(LazyLogits):
    """The [N, L, V] logits of a right-padded batch that ran padding-free (config `padding_free`,
    prefkd/packing.py): only the T real positions exist, as one stream [1, T, V] (the packed rows'
    logits, or a LazyLogits of their hidden states), and `index` [N, L] holds the stream position
    of each (row, position), -1 at padding. The losses read it like any LazyLogits; `chunked` runs
    its function on the stream's positions and lays the per-position results back into rows (zero
    at padding), so no padded vocabulary-sized tensor exists and no padding is projected."""

    def __init__(self, stream: Logits, index: torch.LongTensor):
        if stream.shape[0] != 1 or index.dim() != 2:
            raise ValueError("PackedLogits needs a stream [1, T, V] and an index [N, L]")
        self.stream, self.index = stream, index
        self.hidden = self.weight = self.bias = self.fn = None
        self.children = ()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.index.shape, self.stream.shape[-1]))

    @property
    def requires_grad(self) -> bool:
        return self.stream.requires_grad

    def __getitem__(self, idx) -> "PackedLogits":
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > 2 or not all(isinstance(i, slice) and i.step in (None, 1) for i in idx):
            raise IndexError(f"PackedLogits takes slices of its rows and positions only, got {idx!r}")
        return PackedLogits(self.stream, self.index[idx])

    def detach(self) -> "PackedLogits":
        return PackedLogits(self.stream.detach(), self.index)

    def map(self, fn: Callable) -> "PackedLogits":
        stream = self.stream.map(fn) if isinstance(self.stream, LazyLogits) else chunked(fn, self.stream)
        return PackedLogits(stream, self.index)

    @staticmethod
    def combine_packed(fn: Callable, *parts: "PackedLogits") -> "PackedLogits":
        _same_layout(parts)
        streams = [p.stream for p in parts]
        if all(isinstance(s, LazyLogits) for s in streams):
            return PackedLogits(LazyLogits.combine(fn, *streams), parts[0].index)
        return PackedLogits(chunked(fn, *streams), parts[0].index)

    def materialize(self) -> torch.Tensor:
        """The padded [N, L, V] tensor (zero at padding): for tests and small inputs only."""
        stream = self.stream.materialize() if isinstance(self.stream, LazyLogits) else self.stream
        valid = self.index >= 0
        out = stream.new_zeros(self.shape)
        out[valid] = stream[0, self.index[valid]]
        return out


def _same_layout(parts) -> None:
    index = parts[0].index
    for p in parts[1:]:
        if p.index.shape != index.shape or not torch.equal(p.index, index):
            raise ValueError("packed logits of differently packed batches cannot be combined position by position")


def _take(x: Logits, positions: torch.LongTensor) -> Logits:
    """The stream positions `positions` of a [1, T, V] stream (a LazyLogits: of its hidden states)."""
    if not isinstance(x, LazyLogits):
        return x[:, positions]
    if x.fn is None:
        return LazyLogits(x.hidden[:, positions], x.weight, x.bias)
    return LazyLogits(fn=x.fn, children=tuple(_take(c, positions) for c in x.children))


def _chunked_packed(fn: Callable, tensors, grad: bool) -> torch.Tensor:
    """`chunked` with PackedLogits arguments: fn runs on the stream positions that the (sliced)
    index covers, the row-layout arguments gathered at the same positions; the results are laid
    back into rows, zero at padding."""
    packed = [t for t in tensors if isinstance(t, PackedLogits)]
    _same_layout(packed)
    index = packed[0].index
    valid = index >= 0
    positions = index[valid]  # row-major order over the covered (row, position) pairs
    args = []
    for t in tensors:
        if isinstance(t, PackedLogits):
            args.append(_take(t.stream, positions))
        elif tuple(t.shape[:2]) != tuple(index.shape):
            raise ValueError(f"a [{', '.join(map(str, t.shape))}] argument beside packed logits of "
                             f"[{', '.join(map(str, index.shape))}] rows and positions")
        else:
            args.append(t[valid].unsqueeze(0))
    out = chunked(fn, *args, grad=grad)[0]
    rows = out.new_zeros((*index.shape, *out.shape[1:]))
    rows[valid] = out
    return rows




def _materialized(fn: Callable, *parts):
    """fn applied to the parts, each LazyLogits projected (this chunk only) first."""
    return fn(*(p.materialize() if isinstance(p, LazyLogits) else p for p in parts))


def log_softmax_f32(z: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [..., V] float32 log-softmax."""
    return torch.log_softmax(z.float(), -1)


def chunked(fn: Callable, *tensors: Logits, grad: bool = False) -> torch.Tensor:
    """Apply ``fn`` to slices [:, i:i+c] of every tensor (dim 1 = sequence) and concatenate
    the results along dim 1. ``fn`` must be position-wise (output dim 1 = the slice's length).
    A `LazyLogits` argument reaches ``fn`` as the projected [N, c, V] logits of its slice.

    c = chunk_positions(N, V) with N, V the first tensor's first and last dims.
    ``grad=True`` (and grad enabled): each chunk is recomputed in backward (activation
    checkpointing), so autograd keeps only the inputs' slices, never a full-size temporary
    (for a LazyLogits: the hidden states' slice; the projection is recomputed too).
    Otherwise the chunks are written into one preallocated output, so the peak is the output
    plus one chunk's temporaries (no list of chunks plus a concatenated copy)."""
    if any(isinstance(t, PackedLogits) for t in tensors):
        return _chunked_packed(fn, tensors, grad)
    n, length, vocab = tensors[0].shape[0], tensors[0].shape[1], tensors[0].shape[-1]
    c = chunk_positions(n, vocab)
    use_checkpoint = grad and torch.is_grad_enabled()
    if length <= c and not use_checkpoint:
        return _materialized(fn, *tensors)
    outs, out = [], None
    for i in range(0, length, c):
        parts = [t[:, i:i + c] for t in tensors]
        if use_checkpoint:
            outs.append(torch.utils.checkpoint.checkpoint(_materialized, fn, *parts, use_reentrant=False))
            continue
        y = _materialized(fn, *parts)
        if y.requires_grad:  # an autograd graph through the chunks: keep them and concatenate
            outs.append(y)
            continue
        if out is None:
            out = y.new_empty(y.shape[:1] + (length,) + y.shape[2:])
        out[:, i:i + y.shape[1]] = y
    return out if out is not None else torch.cat(outs, dim=1)


# ------------------------------------------------------------------ the output layer

# Config attributes of models whose logits are not just lm_head(final hidden states): the
# chunked output layer does not apply to them (their full logits are used).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _HiddenStatesHead(torch.nn.Module):
    """Stands in for a causal LM's output layer during one forward pass: returns the final
    hidden states [N, L, H] instead of the logits, and records the output layer's weight [V, H]
    and bias as they are at that moment (under FSDP2: the root's unsharded parameters)."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: the model's module tree is unchanged
        self.weight = self.bias = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.__dict__["weight"], self.__dict__["bias"] = self.head.weight, getattr(self.head, "bias", None)
        # a fresh tensor, not a view of the model's last hidden state (FSDP2 hooks the output)
        return hidden.clone()


def output_head(model):
    """(owner, name, module) of the model's output layer when its logits are exactly
    `module(final hidden states)` with a Linear-like module that is a direct child of `owner`
    (the model, or the transformers model inside a peft model); else None. An adapted output
    layer (a peft layer wrapping one: its output is not weight @ hidden) is None too."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    # peft's wrappers are not plain layers: a LoRA layer (base_layer) adds B A x, and a modules_to_save
    # copy (original_module) answers .weight with the trained copy even while the adapters are off,
    # so the chunked path would project a LoRA policy's reference with the trained head
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or hasattr(head, "base_layer") \
            or hasattr(head, "original_module"):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    owner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    names = [n for n, m in owner.named_children() if m is head]
    return (owner, names[0], head) if names else None


def output_logits(model, model_in: Dict[str, torch.Tensor], chunk: bool, packing=None):
    """The model's logits for one batch: the [N, L, V] tensor, or with chunk=True (and an
    `output_head`) a `LazyLogits` of its final hidden states [N, L, H] and output-layer
    weight [V, H] (+ bias), which the losses project chunk by chunk along the sequence.
    With a `packing` (prefkd/packing.py, config `padding_free`) the model runs on the packed rows
    instead and the result is a `PackedLogits` of the same [N, L, V] shape.

    The whole model runs its forward pass (under FSDP2 the root's hooks unshard the output
    layer once and keep it unsharded until the end of backward, where the gradient that the
    chunks accumulated on the unsharded weight, tied embedding included, is reduce-scattered):
    only the output layer is swapped, for this pass, for one that returns the hidden states.
    The weight is the unsharded tensor the forward pass used, never a sharded DTensor.
    Logits of at most CHUNK_ELEMENTS entries (one chunk) are returned whole."""
    found = output_head(model) if chunk else None
    if found is not None:
        n_positions = packing.tokens if packing is not None else model_in["input_ids"].shape[0] * model_in["input_ids"].shape[1]
        if n_positions * found[2].weight.shape[0] <= CHUNK_ELEMENTS:
            found = None  # the logits fit in one chunk: chunking would only add recomputation

    def forward():
        if packing is not None:
            return packed_forward(model, model_in["input_ids"], packing)
        return model(**model_in, use_cache=False).logits

    if found is None:
        out = forward()
        return out if packing is None else PackedLogits(out, packing.index)
    owner, name, head = found
    stand_in = _HiddenStatesHead(head)
    owner._modules[name] = stand_in
    try:
        hidden = forward()
    finally:
        owner._modules[name] = head
    weight, bias = stand_in.weight, stand_in.bias
    from torch.distributed.tensor import DTensor
    if head.weight is not weight or isinstance(weight, DTensor):
        # resharded after the forward pass (or never unsharded): a frozen model gathers the
        # full weight once; a trained one cannot (its gradient would bypass FSDP)
        if torch.is_grad_enabled() and weight.requires_grad:
            raise RuntimeError("output_chunking: the policy's output layer was resharded after its forward pass "
                               "(reshard_after_forward on the FSDP root?); set output_chunking=false")
        with torch.no_grad():
            weight, bias = (t.full_tensor() if isinstance(t, DTensor) else t for t in (head.weight, head.bias))
    lazy = LazyLogits(hidden, weight, bias)
    return lazy if packing is None else PackedLogits(lazy, packing.index)
