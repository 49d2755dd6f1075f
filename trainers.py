"""The training loop: BasicTrainer (one process), FSDPTrainer (FSDP2, one process per device)
and TensorParallelTrainer (the `tensor_parallel` package's generic wrapper).

The trainer knows nothing about individual losses. It reads the loss's ``LossSpec``
(losses.py): whether the loss trains on pairs or single targets, what it needs of the
frozen reference (per-token log-probs or full logits) and whether it needs a teacher,
whose logits it reduces with the spec's ``teacher_features`` right after the teacher's
forward pass (likewise the teacher's own SFT reference, ``teacher_reference_features``),
and which responses a model must generate for the batch's prompts (``generation``: the
teacher's, the frozen starting student's or the current student's). Everything else (the
loop, evaluation, sampling, checkpoints, resume, logging) is shared.

Checkpoints. ``<run>/step-XXXXXXXX/`` is a Hugging Face directory (config.json,
model.safetensors, tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` loads
with no code of ours, plus ``optimizer.pt``, ``trainer_state.json`` and one RNG file per
rank. It is written under a temporary name; once every file is on disk a ``COMPLETE``
manifest records their sizes, the directory is renamed into place and ``<run>/LATEST`` is
replaced atomically. A step is saved once; the directory LATEST names is never deleted or
rewritten in place; a checkpoint whose files do not match its manifest is not complete, and
``resume=true`` then falls back to the newest complete one. A crash mid-save leaves LATEST
pointing at the previous checkpoint; a failed write (a full disk) removes its partial directory.

Stopping. A non-finite loss or gradient norm stops the run naming the step (or, with
``max_nonfinite_steps=N``, skips up to N such steps in a row), so no non-finite weights are
ever saved. SIGINT / SIGTERM stop at the next step boundary with a checkpoint that
``resume=true`` continues; so a long run loses at most ``save_every_minutes`` of work.
"""
import contextlib
import json
import math
import os
import signal
import time
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from prefkd import generations as generations_lib
from prefkd import lean_loading
import losses as losses_lib
from prefkd import output_cache
import preference_datasets as data
import utils
from utils import RunError, TrainingStopped, rank0_print


class NonFiniteError(RunError):
    """A non-finite loss, gradient norm or weight: the run stops before it can be saved."""


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (a full disk, say); its partial directory is removed."""


# ------------------------------------------------------------------ models

def load_tokenizer(model_cfg):
    return data.get_tokenizer(model_cfg.tokenizer)


def build_model(model_cfg, tokenizer, dtype: torch.dtype, archive: Optional[str] = None, seed: int = 0):
    """Instantiate a causal LM: from `archive` (a checkpoint of ours) if given, else from
    `name_or_path`, else randomly initialised from `init_config` (seeded, so every rank builds
    the same weights). Under lean_loading.deferred() (FSDPTrainer) the model is built on the
    meta device instead, and FSDPTrainer.wrap gives each rank only its own shards of these
    same weights (prefkd/lean_loading.py)."""
    if lean_loading.active():
        from transformers import AutoConfig
        path = utils.resolve_checkpoint(archive) if archive else model_cfg.name_or_path
        config = AutoConfig.from_pretrained(path) if path else init_model_config(model_cfg, tokenizer)
        return lean_loading.meta_model(config, dtype, path,
                                       lambda: _build_full_model(model_cfg, tokenizer, dtype, archive, seed))
    return _build_full_model(model_cfg, tokenizer, dtype, archive, seed)


def init_model_config(model_cfg, tokenizer):
    """The transformers config of a model randomly initialised from `init_config`."""
    from transformers import AutoConfig
    init = OmegaConf.to_container(model_cfg.init_config, resolve=True)
    model_type = init.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **init)


def _build_full_model(model_cfg, tokenizer, dtype: torch.dtype, archive: Optional[str] = None, seed: int = 0):
    from transformers import AutoModelForCausalLM
    if archive:
        return AutoModelForCausalLM.from_pretrained(utils.resolve_checkpoint(archive), dtype=dtype)
    if model_cfg.name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=dtype)
    config = init_model_config(model_cfg, tokenizer)
    with utils_fork_rng(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


@contextlib.contextmanager
def utils_fork_rng(seed: int):
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def check_same_tokenizer(student_tok, teacher_tok, probe: str = "The quick brown fox: 12+34=46.\n"):
    """Teacher and student must share one vocabulary; a mismatch would silently misalign logits."""
    s_ids = student_tok(probe, add_special_tokens=False).input_ids
    t_ids = teacher_tok(probe, add_special_tokens=False).input_ids
    if len(student_tok) != len(teacher_tok) or s_ids != t_ids:
        raise ValueError(
            f"teacher and student tokenizers differ (vocabulary {len(teacher_tok)} vs {len(student_tok)}; "
            f"probe ids {t_ids[:8]}... vs {s_ids[:8]}...): set teacher.tokenizer to the student's tokenizer "
            f"(model.tokenizer) or choose a teacher of the same family")


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
    """(name, module) of the model's output layer when its logits are exactly
    `module(final hidden states)` with a Linear-like module that is a direct child; else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    names = [n for n, m in model.named_children() if m is head]
    return (names[0], head) if names else None


def output_logits(model, model_in: Dict[str, torch.Tensor], chunk: bool):
    """The model's logits for one batch: the [N, L, V] tensor, or with chunk=True (and an
    `output_head`) a `losses.LazyLogits` of its final hidden states [N, L, H] and output-layer
    weight [V, H] (+ bias), which the losses project chunk by chunk along the sequence.

    The whole model runs its forward pass (under FSDP2 the root's hooks unshard the output
    layer once and keep it unsharded until the end of backward, where the gradient that the
    chunks accumulated on the unsharded weight, tied embedding included, is reduce-scattered):
    only the output layer is swapped, for this pass, for one that returns the hidden states.
    The weight is the unsharded tensor the forward pass used, never a sharded DTensor.
    Logits of at most losses.CHUNK_ELEMENTS entries (one chunk) are returned whole."""
    found = output_head(model) if chunk else None
    if found is not None:
        n, length = model_in["input_ids"].shape[:2]
        if n * length * found[1].weight.shape[0] <= losses_lib.CHUNK_ELEMENTS:
            found = None  # the logits fit in one chunk: chunking would only add recomputation
    if found is None:
        return model(**model_in, use_cache=False).logits
    name, head = found
    stand_in = _HiddenStatesHead(head)
    model._modules[name] = stand_in
    try:
        hidden = model(**model_in, use_cache=False).logits
    finally:
        model._modules[name] = head
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
    return losses_lib.LazyLogits(hidden, weight, bias)


# ------------------------------------------------------------------ batches

def concatenated_inputs(batch: Dict, pairwise: bool) -> Dict[str, torch.Tensor]:
    """Stack chosen and rejected into one [2B, L] batch so each model runs one forward pass."""
    if not pairwise:
        return {k: batch[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "labels")}
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    pads = {"input_ids": 0, "attention_mask": 0, "labels": losses_lib.IGNORE_INDEX}
    return {k: torch.cat([utils.pad_to_length(batch[f"chosen_{k}"], length, p),
                          utils.pad_to_length(batch[f"rejected_{k}"], length, p)], dim=0)
            for k, p in pads.items()}


def split_batch(batch: Dict, n: int) -> List[Dict]:
    """Split a local batch into n micro-batches (gradient accumulation)."""
    size = len(batch["prompt"])
    step = size // n
    return [{k: v[i * step:(i + 1) * step] for k, v in batch.items()} for i in range(n)]


# ------------------------------------------------------------------ the basic trainer

class BasicTrainer:
    """Single process; also the base of the distributed trainers."""

    def __init__(self, cfg: DictConfig, run_dir: str, rank: int = 0, world_size: int = 1):
        self.cfg, self.run_dir, self.rank, self.world_size = cfg, run_dir, rank, world_size
        self.device = self.pick_device()
        self.spec = losses_lib.get_loss(cfg.loss.name)
        self.pairwise = self.spec.pairwise
        self.tokenizer = load_tokenizer(cfg.model)
        self.teacher = self.reference = None
        self.examples_seen, self.step = 0, 0
        self.saved_step = None  # the step of the newest checkpoint written or resumed from
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.resume_ckpt = utils.find_resume_checkpoint(run_dir, log=rank0_print) if cfg.resume else None
        self.setup_models()
        self.optimizer = getattr(torch.optim, cfg.optimizer)(
            [p for p in self.policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        if self.resume_ckpt is not None:
            self.load_training_state(self.resume_ckpt)
        if cfg.resume and self.rank == 0:
            trim_metrics(self.metrics_path, self.step)

    # -- set-up ---------------------------------------------------------------
    def pick_device(self) -> torch.device:
        want = self.cfg.trainer.get("device", "auto")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            local = int(os.environ.get("LOCAL_RANK", self.rank % max(1, torch.cuda.device_count())))
            return torch.device("cuda", local)
        return torch.device("cpu")

    def setup_models(self):
        cfg = self.cfg
        validate_loss_models(cfg)
        self._generation_cache = {}  # prompt ids -> response ids of a frozen generating model
        # original prompt -> response text, from generate.py files (`generations`, checked above)
        self._generation_file = generations_lib.read_generations(list(cfg.get("generations") or []))
        self._live_generation_warned = False
        t_tok = None
        if self.spec.teacher_need(cfg.loss):
            # Tokenizers are cheap: check them before any model is loaded.
            t_tok = load_tokenizer(cfg.teacher)
            check_same_tokenizer(self.tokenizer, t_tok)
        # Caches of frozen models' outputs (prefkd/output_cache.py): a cached model is not loaded.
        caches = output_cache.configured(cfg)
        note = output_cache.reference_cache_ignored(cfg)
        if note:
            rank0_print(note)
            caches.pop(output_cache.REFERENCE, None)
        self.teacher_cache, self.reference_cache = (
            output_cache.open_for_run(cfg, kind, self.tokenizer) if kind in caches else None
            for kind in (output_cache.TEACHER, output_cache.REFERENCE))
        resume_ckpt = self.resume_ckpt
        policy_dtype = utils.get_dtype(cfg.model.policy_dtype)
        policy = build_model(cfg.model, self.tokenizer, policy_dtype, resume_ckpt or cfg.model.archive, cfg.seed)
        need_ref = self.spec.reference_need(cfg.loss)
        reference = None
        if self.spec.reference_model_need(cfg.loss) and self.reference_cache is None:  # outputs, or generations
            ref_dtype = utils.get_dtype(cfg.model.reference_dtype)
            # The reference is the *starting* policy (never the resumed one): build it from the
            # same archive / seed the policy started from.
            reference = build_model(cfg.model, self.tokenizer, ref_dtype, cfg.model.archive, cfg.seed)
            freeze(reference)
        teacher = None
        if self.spec.teacher_need(cfg.loss) and self.teacher_cache is None:
            teacher = build_model(cfg.teacher, t_tok, utils.get_dtype(cfg.teacher.reference_dtype),
                                  cfg.teacher.archive, cfg.seed + 1)
            freeze(teacher)
        teacher_reference = self.build_teacher_reference(t_tok)
        if cfg.activation_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy = self.wrap(policy, cfg.model, trainable=True)
        self.reference = self.wrap(reference, cfg.model, trainable=False) if reference is not None else None
        self.teacher = self.wrap(teacher, cfg.teacher, trainable=False) if teacher is not None else None
        self.teacher_reference = (self.wrap(teacher_reference, cfg.teacher, trainable=False)
                                  if teacher_reference is not None else None)
        n = sum(p.numel() for p in policy.parameters())
        rank0_print(f"policy: {n / 1e6:.2f} M parameters; "
                    f"reference: {need_ref or ('generation only' if reference is not None else 'none')}"
                    f"{' (cached: ' + self.reference_cache.path + ')' if self.reference_cache else ''}; "
                    f"teacher: {cfg.teacher.name if teacher is not None or self.teacher_cache else 'none'}"
                    f"{' (cached: ' + self.teacher_cache.path + ')' if self.teacher_cache else ''}"
                    f"{' and its reference' if teacher_reference is not None else ''}; device {self.device}")

    def build_teacher_reference(self, t_tok):
        """The teacher's own SFT reference (`teacher.reference_archive`), frozen, when the loss's
        spec has `teacher_reference_features`; else None. Same model config, dtype and (in
        setup_models) wrapping / sharding as the teacher."""
        cfg = self.cfg
        if not self.spec.teacher_reference_need(cfg.loss) or self.teacher_cache is not None:
            return None
        model = build_model(cfg.teacher, t_tok, utils.get_dtype(cfg.teacher.reference_dtype),
                            cfg.teacher.reference_archive, cfg.seed + 2)
        return freeze(model)

    def wrap(self, model, model_cfg, trainable: bool):
        return model.to(self.device)

    # -- generated responses (losses.Generation) --------------------------------
    def generated_batch(self, batch: Dict, train: bool):
        """The batch with the responses the loss's `Generation` asks for, generated for its prompts
        (before any forward pass). Returns (batch, generated): generated is None when the loss
        trains on data responses only, else whether this micro-batch was generated. The draw of a
        probability < 1 and the cache decisions are identical on every rank (sharded models
        generate together)."""
        gen = self.spec.generation_need(self.cfg.loss)
        if gen is None or (gen.train_only and not train):
            return batch, None
        if gen.probability < 1.0 and not self.draw_generation(gen.probability, train):
            return batch, False
        model = {"teacher": self.teacher, "reference": self.reference, "policy": self.policy}[gen.source]
        prompts = [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        keys = [tuple(p) for p in prompts]
        cache = self._generation_cache if gen.frozen else None
        if cache is not None and self._generation_file:
            self.fill_from_generation_file(cache, keys, batch.get("original_prompt", batch["prompt"]))
        missing = cache is None or any(k not in cache for k in keys)
        if cache is not None:
            missing = self.any_rank(missing)
        if missing:
            responses = self.generate_responses(model, batch["prompt_input_ids"], batch["prompt_attention_mask"], gen)
            if cache is not None:  # a frozen source's generation is kept: each prompt is generated once
                responses = [cache.setdefault(k, r) for k, r in zip(keys, responses)]
        else:
            responses = [cache[k] for k in keys]
        out = replace_responses(batch, gen.replaces, prompts, [r.tolist() for r in responses],
                                self.tokenizer.pad_token_id, self.cfg.max_length)
        out[gen.replaces] = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return out, True

    def fill_from_generation_file(self, cache: Dict, keys: List[tuple], originals: List) -> None:
        """Put the `generations` file's responses for these prompts into the generation cache:
        the text as the data module encodes a response (its tokens, then EOS)."""
        absent = 0
        for key, original in zip(keys, originals):
            if key in cache:
                continue
            text = self._generation_file.get(generations_lib.generation_key(original))
            if text is None:
                absent += 1
                continue
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            cache[key] = torch.tensor(ids, dtype=torch.long)
        if absent and not self._live_generation_warned:
            self._live_generation_warned = True
            rank0_print(f"WARNING: {absent} prompt(s) of a batch are not in the generations files "
                        f"{list(self.cfg.generations)}: they are generated in the run (warned once)")

    def draw_generation(self, probability: float, train: bool) -> bool:
        """True with `probability`, from a generator seeded by (seed, step, micro-batch index):
        the same on every rank and after a resume."""
        key = (self.step, train)
        self._draw_index = self._draw_index + 1 if getattr(self, "_draw_key", None) == key else 0
        self._draw_key = key
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + self.step * 1_009 + self._draw_index
                                          + (0 if train else 500_000_000))
        return bool(torch.rand((), generator=g) < probability)

    def any_rank(self, flag: bool) -> bool:
        if not utils.is_distributed():
            return flag
        t = torch.tensor([int(flag)], device=self.device if self.dist_on_device else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @torch.no_grad()
    def generate_responses(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           gen: "losses_lib.Generation") -> List[torch.Tensor]:
        """Responses of `model` to left-padded prompts: one CPU LongTensor per row, cut after the
        first EOS (kept, as data responses end with it); at most max_length - prompt width tokens."""
        ids, mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        budget = max(1, self.cfg.max_length - ids.shape[1])
        max_new = min(gen.max_new_tokens or budget, budget)
        if gen.temperature is None:
            decoding = {"do_sample": False, "num_beams": gen.num_beams}
        else:
            decoding = {"do_sample": True, "temperature": float(gen.temperature), "top_k": 0, "top_p": 1.0}
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                 **decoding, **self.generate_kwargs())
        finally:
            model.train(was_training)
        eos, rows = self.tokenizer.eos_token_id, []
        for row in out[:, ids.shape[1]:].cpu():
            hits = (row == eos).nonzero()
            rows.append(row[: int(hits[0]) + 1 if len(hits) else len(row)].clone())
        return rows

    # -- forward / loss -------------------------------------------------------
    def compute_loss(self, batch: Dict, train: bool):
        """One (micro-)batch -> (loss, {metric: per-example tensor})."""
        batch, generated = self.generated_batch(batch, train)
        inputs = utils.move_batch(concatenated_inputs(batch, self.pairwise), self.device)
        model_in = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        labels = inputs["labels"]
        extra = {}
        with torch.no_grad():
            if self.teacher_cache is not None:  # features precomputed by precompute.py
                extra["teacher"] = self.teacher_cache.lookup(inputs["input_ids"], labels, inputs["attention_mask"],
                                                             self.device)
            elif self.spec.teacher_features is not None:
                t_logits = self.logits(self.teacher, model_in)
                extra["teacher"] = self.spec.teacher_features(t_logits, labels, self.cfg.loss)
                del t_logits
                if self.teacher_reference is not None:
                    tr_logits = self.logits(self.teacher_reference, model_in)
                    extra["teacher"] = self.spec.teacher_reference_features(tr_logits, labels, self.cfg.loss,
                                                                            extra["teacher"])
                    del tr_logits
            need = self.spec.reference_need(self.cfg.loss)
            if need and self.reference_cache is not None:
                extra["reference_logps"] = self.reference_cache.lookup(
                    inputs["input_ids"], labels, inputs["attention_mask"], self.device)["reference_logps"]
            elif need:
                r_logits = self.logits(self.reference, model_in)
                if need == "logps":
                    extra["reference_logps"] = losses_lib.token_logps(r_logits, labels)
                    del r_logits
                else:
                    extra["reference_logits"] = r_logits
        with contextlib.nullcontext() if train else torch.no_grad():
            logits = self.logits(self.policy, model_in)
            inp = losses_lib.LossInputs(policy_logits=logits, labels=labels,
                                        n_pairs=len(batch["prompt"]), **extra)
            loss, metrics = self.spec.compute(inp, self.cfg.loss)
        if generated is not None:
            metrics["generated/fraction"] = torch.full((len(batch["prompt"]),), float(generated))
        return loss, metrics

    def logits(self, model, model_in: Dict[str, torch.Tensor]):
        """`model`'s logits: [N, L, V], or with output_chunking a losses.LazyLogits (output_logits)."""
        return output_logits(model, model_in, chunk=bool(self.cfg.get("output_chunking", False))
                             and self.chunkable(model))

    def chunkable(self, model) -> bool:
        """Whether the chunked output layer applies to this (wrapped) model."""
        return True

    # -- the loop -------------------------------------------------------------
    def batch_iterator(self, split: str, skip_batches: int = 0, pairs: bool = False) -> Iterator[Dict]:
        cfg = self.cfg
        train = split == "train"
        return data.get_batch_iterator(
            list(cfg.datasets), self.tokenizer, split=split,
            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
            shuffle=train, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
            sft_mode=self.spec.sft_targets and not pairs, n_epochs=cfg.n_epochs if train else 1,
            n_examples=cfg.n_examples if train else cfg.n_eval_examples, seed=cfg.seed, silent=True,
            rank=self.rank, world_size=self.world_size, truncation_mode=cfg.truncation_mode,
            skip_batches=skip_batches, options=cfg.get("data"), cache_dir=data.cache_dir_of(cfg.get("data")))

    def train(self):
        cfg = self.cfg
        batches = self.batch_iterator("train", skip_batches=self.step)
        bar = None
        if cfg.progress_bar and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=cfg.n_examples or None, initial=self.examples_seen, unit="ex", dynamic_ncols=True)
        if cfg.do_first_eval and self.step == 0:
            self.evaluate()
        last_saved, evaluated_last = self.examples_seen, False
        self.last_save_time = self.t0 = time.time()
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        with StopSignals() as signals:
            for batch in batches:
                logged = self.train_step(batch)
                stop, time_due = self.agree([signals.received is not None, self.save_time_due()])
                if logged is None:  # a skipped non-finite step
                    continue
                if bar is not None:
                    bar.update(cfg.batch_size)
                    bar.set_postfix(loss=f"{logged['loss/train']:.4f}", ex_s=f"{logged['examples_per_second']:.1f}")
                # evaluation at the first step boundary past each multiple of eval_every
                evaluated_last = bool(cfg.eval_every) and \
                    self.examples_seen // cfg.eval_every > (self.examples_seen - cfg.batch_size) // cfg.eval_every
                if evaluated_last:
                    self.evaluate()
                if stop or time_due or (cfg.save_every and self.examples_seen - last_saved >= cfg.save_every):
                    self.save()
                    last_saved = self.examples_seen
                if stop:
                    raise TrainingStopped(f"stopped by {signals.name or 'a signal on another rank'} at step "
                                          f"{self.step} ({self.examples_seen} examples); checkpoint "
                                          f"{self.run_dir}/step-{self.step:08d} saved: resume=true continues")
        if bar is not None:
            bar.close()
        if not evaluated_last:
            self.evaluate()
        self.save()
        if self.rank == 0:
            # DONE marks a run that reached its end: `resume=true` on it is then a no-op.
            utils.atomic_write_json(os.path.join(self.run_dir, "DONE"),
                                    {"step": self.step, "examples_seen": self.examples_seen,
                                     "n_examples": self.cfg.n_examples, "n_epochs": self.cfg.n_epochs})

    def train_step(self, batch: Dict) -> Optional[Dict[str, float]]:
        """One optimizer step on a global batch; returns the logged metrics, or None when the
        loss or gradient norm was non-finite and the step was skipped (max_nonfinite_steps)."""
        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        self.policy.train()
        step_metrics: Dict[str, List[torch.Tensor]] = {}
        for i, mb in enumerate(split_batch(batch, accum)):
            with self.sync_context(last=i == accum - 1):
                loss, metrics = self.compute_loss(mb, train=True)
                (loss / accum).backward()
            metrics["loss"] = loss.detach().reshape(1)
            for k, v in metrics.items():
                step_metrics.setdefault(k, []).append(v.detach().float().reshape(-1).cpu())
        grad_norm = self.clip_gradients()
        local_loss = float(torch.cat(step_metrics["loss"]).sum())
        (nonfinite,) = self.agree([not (math.isfinite(local_loss) and math.isfinite(grad_norm))])
        self.step += 1
        self.examples_seen += cfg.batch_size
        if nonfinite:
            return self.skip_nonfinite_step(local_loss, grad_norm)
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        logged = self.reduce_metrics(step_metrics, "train")
        logged["grad_norm"] = grad_norm
        logged["lr"] = self.scheduler.get_last_lr()[0]
        logged["examples_per_second"] = cfg.batch_size / max(1e-9, time.time() - self.t0)
        if self.nonfinite_total:
            logged["nonfinite_skipped"] = self.nonfinite_total
        self.t0 = time.time()
        self.log(logged)
        return logged

    def skip_nonfinite_step(self, loss: float, grad_norm: float) -> None:
        """Drop this step's gradients; stop (NonFiniteError) past max_nonfinite_steps in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        allowed = int(self.cfg.get("max_nonfinite_steps") or 0)
        what = f"non-finite loss or gradient norm at step {self.step} (loss {loss}, grad_norm {grad_norm} on rank {self.rank})"
        if self.nonfinite_in_a_row > allowed:
            latest = utils.latest_name(self.run_dir)
            raise NonFiniteError(
                f"{what}: training stopped, nothing of this step was applied or saved"
                + (f" (the last checkpoint, {latest}, is finite)" if latest else "")
                + f". Lower lr (now {self.cfg.lr}) or check the data; max_nonfinite_steps=N skips up to N such "
                  f"steps in a row" + (f" ({allowed} allowed now)" if allowed else ""))
        rank0_print(f"warning: {what}: step skipped ({self.nonfinite_in_a_row} in a row, "
                    f"{self.nonfinite_total} in all; max_nonfinite_steps={allowed})")
        self.log({"nonfinite_skipped": self.nonfinite_total})
        return None

    def save_time_due(self) -> bool:
        minutes = self.cfg.get("save_every_minutes")
        return bool(minutes) and self.rank == 0 and time.time() - self.last_save_time >= 60.0 * float(minutes)

    def agree(self, flags: List[bool]) -> List[bool]:
        """Each flag true on every rank if it is true on any (one small all-reduce), so that all
        ranks skip, save or stop at the same step."""
        if not utils.is_distributed():
            return [bool(f) for f in flags]
        t = torch.tensor([float(f) for f in flags], device=self.device if self.dist_on_device else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]

    def sync_context(self, last: bool):
        return contextlib.nullcontext()

    def clip_gradients(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def reduce_metrics(self, metrics: Dict[str, List[torch.Tensor]], split: str) -> Dict[str, float]:
        """Concatenate per-example metrics over micro-batches and ranks; return their means,
        keyed as in docs/losses.md (`rewards/chosen` -> `rewards_{split}/chosen`)."""
        out = {}
        for k in sorted(metrics):
            v = utils.all_gather_cat(torch.cat(metrics[k]).to(self.device if self.dist_on_device else "cpu"))
            head, _, tail = k.partition("/")
            out[f"{head}/{split}" if not tail else f"{head}_{split}/{tail}"] = float(v.float().mean())
        return out

    @property
    def dist_on_device(self) -> bool:
        return self.device.type == "cuda"

    def evaluate(self) -> Dict[str, float]:
        self.policy.eval()
        collected: Dict[str, List[torch.Tensor]] = {}
        samples = []
        for batch in self.batch_iterator("test"):
            loss, metrics = self.compute_loss(batch, train=False)
            metrics["loss"] = loss.detach().reshape(1)
            for k, v in metrics.items():
                collected.setdefault(k, []).append(v.detach().float().reshape(-1).cpu())
        for k, v in self.heldout_preference().items():
            collected.setdefault(k, []).append(v)
        if self.cfg.sample_during_eval:
            task = self.sample_and_score()
            for k, v in task.items():
                collected.setdefault(k, []).append(v)
            samples = getattr(self, "_last_samples", [])
        result = self.reduce_metrics(collected, "eval")
        self.log(result, eval_samples=samples)
        rank0_print(f"eval @ {self.examples_seen} examples: " +
                    ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    @torch.no_grad()
    def heldout_preference(self) -> Dict[str, torch.Tensor]:
        """Loss-independent preference accuracy on held-out pairs: does the policy give the
        chosen response a higher log-probability than the rejected one? Logged for every
        loss (KD losses have no implicit reward), so methods compare on one curve."""
        acc = []
        if not data.pairs_available(list(self.cfg.datasets), self.cfg.get("data")):
            return {}  # SFT-only data sets have no pairs to rank
        for batch in self.batch_iterator("test", pairs=True):
            inputs = utils.move_batch(concatenated_inputs(batch, pairwise=True), self.device)
            logits = self.logits(self.policy, {"input_ids": inputs["input_ids"],
                                               "attention_mask": inputs["attention_mask"]})
            lp = losses_lib.sequence_logps(losses_lib.token_logps(logits, inputs["labels"]),
                                           losses_lib.response_mask(inputs["labels"]))
            chosen, rejected = losses_lib.split_pairs(lp, len(batch["prompt"]))
            acc.append((chosen > rejected).float().cpu())
        return {"heldout/logp_accuracy": torch.cat(acc)} if acc else {}

    def generate(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.policy.generate(input_ids=prompt_ids, attention_mask=attention_mask, do_sample=False,
                                    max_new_tokens=self.cfg.max_new_tokens,
                                    pad_token_id=self.tokenizer.pad_token_id, **self.generate_kwargs())

    def generate_kwargs(self) -> Dict:
        return {}

    @torch.no_grad()
    def sample_and_score(self) -> Dict[str, torch.Tensor]:
        """Greedy generations for held-out prompts, scored by the data set's scorer (data.scorer;
        prefkd/scorers.py) on the original prompt: logged as task/<name>."""
        from prefkd import scorers
        scorer = scorers.for_config(self.cfg.datasets, self.cfg.get("data")).common()
        scores = {}
        self._last_samples = []
        n_wanted = self.cfg.n_eval_samples
        seen = 0
        for batch in self.batch_iterator("test"):
            if seen >= n_wanted:
                break
            ids = batch["prompt_input_ids"].to(self.device)
            mask = batch["prompt_attention_mask"].to(self.device)
            out = self.generate(ids, mask)
            for prompt, original, row in zip(batch["prompt"], batch["original_prompt"], out[:, ids.shape[1]:]):
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                self._last_samples.append((prompt, text))
                for name, value in (scorer(original, text) if scorer is not None else {}).items():
                    scores.setdefault(f"task/{name}", []).append(value)
            seen += len(batch["prompt"]) * self.world_size
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items() if v}

    # -- logging ---------------------------------------------------------------
    def log(self, metrics: Dict[str, float], eval_samples=None):
        if self.rank != 0:
            return
        record = {"step": self.step, "examples": self.examples_seen, **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        run = getattr(self, "wandb_run", None)
        if run is not None:
            payload = dict(metrics)
            if eval_samples:
                import wandb
                payload["samples"] = wandb.Table(columns=["prompt", "completion"], data=[list(s) for s in eval_samples])
            run.log(payload, step=self.examples_seen)

    # -- checkpoints -------------------------------------------------------------
    def full_state_dicts(self):
        """(model state dict, optimizer state dict), full and on the CPU, on rank 0."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.policy, options=opts),
                get_optimizer_state_dict(self.policy, self.optimizer, options=opts))

    def save(self):
        """Write <run>/step-N: files into a temporary directory, then the COMPLETE manifest, then
        rename it into place, point LATEST at it and prune old checkpoints. Refuses non-finite
        weights; on a failed write (a full disk) removes the partial directory and leaves LATEST
        as it was."""
        if self.saved_step == self.step:
            return  # this step is on disk already: never write (or replace) it twice
        name = f"step-{self.step:08d}"
        model_sd, optim_sd = self.full_state_dicts()
        finite = self.rank != 0 or (utils.all_finite(model_sd.values()) and
                                    utils.all_finite(v for st in optim_sd.get("state", {}).values()
                                                     for v in (st.values() if isinstance(st, dict) else [])))
        if self.agree([not finite])[0]:
            raise NonFiniteError(f"the weights or optimizer state at step {self.step} are not finite: checkpoint "
                                 f"{name} not written (LATEST still names {utils.latest_name(self.run_dir)})")
        tmp = os.path.join(self.run_dir, f".{name}.tmp")
        failure = None
        try:
            if self.rank == 0:
                utils.remove_tree(tmp)
                os.makedirs(tmp)
            utils.barrier()
            torch.save(utils.get_rng_state(), os.path.join(tmp, f"rng_rank{self.rank}.pt"))
            if self.rank == 0:
                self.write_checkpoint_files(tmp, model_sd, optim_sd)
        except (OSError, RuntimeError) as e:
            failure = e
        if self.agree([failure is not None])[0]:
            if self.rank == 0:
                utils.remove_tree(tmp)
            cause = failure or RuntimeError("a write failed on another rank")
            plain = utils.describe_write_error(cause, self.run_dir)
            raise CheckpointWriteError(
                f"writing checkpoint {self.run_dir}/{name} failed: {plain or f'{type(cause).__name__}: {cause}'}; "
                f"the partial checkpoint was removed and LATEST still names {utils.latest_name(self.run_dir)}") from failure
        utils.barrier()
        if self.rank == 0:
            try:
                self.publish_checkpoint(tmp, name)
            except OSError as e:
                utils.remove_tree(tmp)
                plain = utils.describe_write_error(e, self.run_dir)
                raise CheckpointWriteError(f"publishing checkpoint {self.run_dir}/{name} failed: {plain or e}; "
                                           f"LATEST names {utils.latest_name(self.run_dir)}") from e
            rank0_print(f"saved {os.path.join(self.run_dir, name)}")
        utils.barrier()
        self.saved_step = self.step
        self.last_save_time = time.time()

    def write_checkpoint_files(self, tmp: str, model_sd: Dict, optim_sd: Dict) -> None:
        from safetensors.torch import save_file
        config = unwrap_config(self.policy)
        if getattr(config, "tie_word_embeddings", False):
            model_sd.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in model_sd.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        gen = getattr(self.policy, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optim_sd, "scheduler": self.scheduler.state_dict()}, os.path.join(tmp, "optimizer.pt"))
        utils.atomic_write_json(os.path.join(tmp, "trainer_state.json"), {
            "step": self.step, "examples_seen": self.examples_seen, "world_size": self.world_size,
            "config": OmegaConf.to_container(self.cfg, resolve=True)})
        utils.write_manifest(tmp)

    def publish_checkpoint(self, tmp: str, name: str) -> None:
        """Rename the finished `tmp` to <run>/<name> and point LATEST at it. A directory already
        called <name> (an abandoned or damaged attempt at this step) is moved aside first, and
        if LATEST names it, LATEST is first pointed at the newest complete checkpoint, so LATEST
        never names a directory that is being replaced."""
        final = os.path.join(self.run_dir, name)
        aside = None
        if os.path.exists(final):
            if utils.latest_name(self.run_dir) == name:
                others = [c for c in utils.list_checkpoints(self.run_dir)
                          if c != name and utils.is_complete_checkpoint(os.path.join(self.run_dir, c))]
                if others:
                    utils.atomic_write_text(os.path.join(self.run_dir, "LATEST"), others[-1] + "\n")
                else:
                    os.remove(os.path.join(self.run_dir, "LATEST"))
            aside = os.path.join(self.run_dir, f".{name}.old.{os.getpid()}")
            os.replace(final, aside)
        os.replace(tmp, final)
        utils.fsync_dir(self.run_dir)
        utils.atomic_write_text(os.path.join(self.run_dir, "LATEST"), name + "\n")
        if aside:
            utils.remove_tree(aside)
        self.prune_checkpoints(keep=name)

    def prune_checkpoints(self, keep: str):
        """Keep the newest keep_checkpoints complete checkpoints (always `keep`, the one LATEST
        names); incomplete directories other than those are debris of crashed saves."""
        n_keep = max(1, self.cfg.keep_checkpoints or 1)
        complete = [d for d in utils.list_checkpoints(self.run_dir)
                    if utils.is_complete_checkpoint(os.path.join(self.run_dir, d))]
        for d in complete[:-n_keep]:
            if d != keep:
                utils.remove_tree(os.path.join(self.run_dir, d))

    def load_training_state(self, ckpt: str):
        """Restore optimizer, scheduler, counters and RNG from a checkpoint (the weights were
        loaded when the policy was built)."""
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        if state["world_size"] != self.world_size:
            rank0_print(f"note: resuming a {state['world_size']}-process run with {self.world_size} processes; "
                        "the data order is global, so the losses stay those of the same global batches")
        blob = torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu", weights_only=False)
        self.load_optimizer_state(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.step, self.examples_seen = state["step"], state["examples_seen"]
        self.saved_step = self.step
        rng = os.path.join(ckpt, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng):
            utils.set_rng_state(torch.load(rng, weights_only=False))
        rank0_print(f"resumed from {ckpt} at step {self.step} ({self.examples_seen} examples)")


    def load_optimizer_state(self, optim_sd):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.policy, self.optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


def trim_metrics(path: str, step: int) -> None:
    """On resume, drop the records of steps beyond the checkpoint (they are redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except ValueError:
            pass  # a line cut short by a crash
    if len(kept) != len(lines):
        utils.atomic_write_text(path, "".join(kept))
        rank0_print(f"metrics.jsonl: {len(lines) - len(kept)} records beyond step {step} removed (they are redone)")


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`: the loop saves a checkpoint at the
    next step boundary and stops. A third signal interrupts at once."""

    def __init__(self):
        self.received, self.name, self.count, self.previous = None, None, 0, {}

    def handle(self, signum, frame):
        self.count += 1
        self.received, self.name = signum, signal.Signals(signum).name
        if self.count >= 3:
            raise KeyboardInterrupt(f"{self.name} received 3 times: stopping without a checkpoint")
        rank0_print(f"\n{self.name}: saving a checkpoint at the end of this step, then stopping "
                    "(send it twice more to stop at once)")

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def validate_loss_models(cfg, check_archives: bool = True) -> None:
    """What the loss's spec needs of the models that the config must provide, checked before any
    model is loaded (train.validate_config and setup_models call it). check_archives=False: the
    key must be set, but its checkpoint may not exist yet (a pipeline's later stage)."""
    spec = losses_lib.get_loss(cfg.loss.name)
    if spec.teacher_reference_need(cfg.loss):
        archive = cfg.teacher.get("reference_archive")
        if not archive:
            raise ValueError(f"loss={cfg.loss.name} needs the teacher's own SFT reference as a second frozen model: "
                             "pass teacher.reference_archive=<the SFT run the teacher was DPO-trained from>/LATEST")
        path = utils.resolve_checkpoint(archive)
        if check_archives and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"teacher.reference_archive={archive!r} is not a checkpoint (no config.json at {path}); "
                             "point it at a run directory, its LATEST file or a step-* directory")
    gen = spec.generation_need(cfg.loss)
    if gen is not None:
        if gen.source not in losses_lib.GENERATION_SOURCES:
            raise ValueError(f"loss={cfg.loss.name}: unknown generation source {gen.source!r}")
        if gen.replaces not in (("chosen", "rejected") if spec.pairwise else ("chosen",)):
            raise ValueError(f"loss={cfg.loss.name}: generations cannot replace {gen.replaces!r} responses")
        if not 0.0 <= gen.probability <= 1.0:
            raise ValueError(f"loss={cfg.loss.name}: generation probability {gen.probability} is not in [0, 1]")
    if cfg.get("generations"):
        check_generation_files(cfg, gen, check_archives)
    if output_cache.configured(cfg):  # teacher.cache / reference_cache: usable by this loss, and up to date
        output_cache.check_config(cfg, load_tokenizer(cfg.model), check_exists=check_archives)


def check_generation_files(cfg, gen, check_archives: bool) -> None:
    """`generations=[files]` (written by generate.py) stand in for the responses a loss generates
    with a frozen model; each file's recorded checkpoint and decoding must be the loss's own.
    check_archives=False (a pipeline's later stage): the files may not exist yet."""
    files = cfg.generations
    if isinstance(files, str) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"generations={files!r} must be a list of files written by generate.py, e.g. "
                         "generations=[gen_train.jsonl,gen_test.jsonl]")
    if gen is None or not gen.frozen:
        raise ValueError(f"generations=...: loss={cfg.loss.name} "
                         + ("trains on the data's responses" if gen is None else "samples from the current policy")
                         + "; a generations file is read only by losses whose responses come from a frozen model "
                         "(seqkd: the teacher; adpa: the starting student). Remove the key")
    if not check_archives:
        return
    source_key = "teacher.archive" if gen.source == "teacher" else "model.archive"
    source = OmegaConf.select(cfg, source_key)
    expected = {"checkpoint": utils.resolve_checkpoint(source) if source else None,
                "do_sample": gen.temperature is not None, "max_prompt_length": cfg.max_prompt_length,
                "truncation_mode": cfg.truncation_mode}
    if gen.temperature is not None:
        expected.update({"temperature": float(gen.temperature), "top_p": 1.0})
    if gen.max_new_tokens is not None:
        expected["max_new_tokens"] = int(gen.max_new_tokens)
    for path in files:
        meta = generations_lib.read_generation_meta(path)
        if gen.num_beams != 1:
            raise ValueError(f"generations: loss.num_beams={gen.num_beams}, but generate.py decodes greedily "
                             f"or samples ({path}); set loss.num_beams=1 or drop generations=")
        for key, want in expected.items():
            got = meta.get(key)
            same = (got == want) if not isinstance(want, float) else (got is not None and abs(float(got) - want) < 1e-9)
            if not same:
                raise ValueError(f"generations: {path} was written with {key}={got!r}, but this run's "
                                 f"{source_key if key == 'checkpoint' else key} gives {want!r}; regenerate it "
                                 "with generate.py for this run's settings, or drop generations=")


def replace_responses(batch: Dict, key: str, prompts: List[List[int]], responses: List[List[int]],
                      pad_token_id: int, max_length: int) -> Dict:
    """A copy of `batch` whose `key` ("chosen" / "rejected") responses are `responses`: per row,
    ids = prompt + response (cut to max_length), labels = IGNORE_INDEX on the prompt, right-padded
    like the data module's batches. prompts: unpadded prompt ids per row."""
    ids, labels = [], []
    for p, r in zip(prompts, responses):
        r = list(r)[: max(0, max_length - len(p))]
        ids.append(list(p) + r)
        labels.append([losses_lib.IGNORE_INDEX] * len(p) + r)
    out = dict(batch)
    out[f"{key}_input_ids"] = data.pad_sequences(ids, pad_token_id)
    out[f"{key}_attention_mask"] = data.pad_sequences([[1] * len(s) for s in ids], 0)
    out[f"{key}_labels"] = data.pad_sequences(labels, losses_lib.IGNORE_INDEX)
    return out


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unwrap_config(model):
    return model.config if hasattr(model, "config") else model.module.config


# ------------------------------------------------------------------ FSDP

class FSDPTrainer(BasicTrainer):
    """FSDP2: ``fully_shard`` on every decoder block, then on the root, for the policy, the
    reference and the teacher alike. bf16 mixed precision with fp32 gradient reduction when
    ``model.fsdp_policy_mp=bfloat16``."""

    def pick_device(self):
        device = super().pick_device()
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        return device

    def setup_models(self):
        # trainer.lean_loading (default on): build_model returns meta-device models that wrap
        # materialises shard by shard, so no rank ever holds a whole model it does not need.
        with lean_loading.deferred(self.cfg.trainer.get("lean_loading", True)):
            super().setup_models()

    def wrap(self, model, model_cfg, trainable: bool):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # No model.to(device) first: fully_shard moves each rank's shard to the mesh's device,
        # so a GPU never holds the whole model.
        mp_dtype = utils.get_dtype(model_cfg.fsdp_policy_mp)
        mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
        block = model_cfg.block_name
        n_blocks = 0
        for module in model.modules():
            if type(module).__name__ == block:
                fully_shard(module, mesh=self.mesh, mp_policy=mp)
                n_blocks += 1
        if n_blocks == 0:
            raise ValueError(f"{model_cfg.name}: block_name={block!r} matches no module of {type(model).__name__}: "
                             "set it to the model's decoder layer class")
        fully_shard(model, mesh=self.mesh, mp_policy=mp)
        # A model built deferred (meta device, see setup_models) gets its weights now: each
        # rank only its own shards.
        strategy = lean_loading.materialize(model, self.device)
        if strategy:
            rank0_print(f"{model_cfg.name}: loaded lean ({strategy})")
        return model

    def sync_context(self, last: bool):
        # Accumulate unreduced gradients locally and reduce-scatter once, on the last micro-batch.
        self.policy.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def generate_kwargs(self):
        # Every rank must run the same number of forward passes: sharded blocks all-gather.
        return {"synced_gpus": True}


# ------------------------------------------------------------------ tensor parallel

class TensorParallelTrainer(BasicTrainer):
    """One process; the policy split over several devices by ``tensor_parallel.TensorParallel``.
    Its ``tensor_parallel()`` entry point cannot shard HF Llama on transformers 5 (see README),
    so the generic module wrapper is used. The reference and teacher stay unsharded."""

    def chunkable(self, model) -> bool:
        # the wrapper splits the policy's output layer over devices: its full logits are used
        return model is not self.policy

    def wrap(self, model, model_cfg, trainable: bool):
        model = model.to(self.device)
        if not trainable:
            return model
        import tensor_parallel as tp
        devices = ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if self.device.type == "cuda"
                   else ["cpu"] * self.cfg.trainer.cpu_devices)
        wrapped = tp.TensorParallel(model, devices)
        wrapped.config = model.config
        wrapped.generation_config = getattr(model, "generation_config", None)
        return wrapped

    def full_state_dicts(self):
        # The wrapper's own state dict holds per-shard names; this context gathers the shards
        # back under the underlying model's names. The optimizer state stays per-shard: a
        # TensorParallel run resumes on the same number of devices.
        import tensor_parallel as tp
        with tp.save_tensor_parallel(self.policy):
            model_sd = {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}
        return model_sd, self.optimizer.state_dict()

    def load_optimizer_state(self, optim_sd):
        self.optimizer.load_state_dict(optim_sd)


TRAINERS = {"BasicTrainer": BasicTrainer, "FSDPTrainer": FSDPTrainer, "TensorParallelTrainer": TensorParallelTrainer}
