"""Run a frozen model once over a run's examples and cache what the loss reads of it.

    python precompute.py teacher   <train.py overrides> teacher.cache=<dir>
    python precompute.py reference <train.py overrides> reference_cache=<dir>

then train with the same overrides (the cache key stays on the command line): the cached model
is not loaded. For example, TVKD with a cached teacher and a cached reference:

    python precompute.py teacher loss=tvkd teacher=tiny_teacher teacher.archive=runs/t/LATEST \
        model.archive=runs/s/LATEST teacher.cache=caches/tvkd_t
    python precompute.py reference loss=tvkd model.archive=runs/s/LATEST reference_cache=caches/ref_s
    python train.py loss=tvkd teacher=tiny_teacher teacher.archive=runs/t/LATEST model.archive=runs/s/LATEST \
        teacher.cache=caches/tvkd_t reference_cache=caches/ref_s

The overrides are train.py's (the same Hydra config), so data sets, tokenisation, lengths and
truncation are exactly the run's. `teacher` stores the dict the loss's ``teacher_features``
(and ``teacher_reference_features``, e.g. ddpo) return; `reference` the reference's per-token
log-probs. The examples covered are those the run reads: its training plan (``seed``,
``batch_size``, ``n_examples`` / ``n_epochs``) and its held-out plan (``n_eval_examples``);
``n_epochs=1 n_examples=null`` covers a whole train split. The cache is written to a temporary
directory and renamed into place at the end (``overwrite=true`` replaces an existing one); its
key and layout are described in output_cache.py. The models run in one process (GPU if
available, in their ``reference_dtype``).
"""
import copy
import os
import sys
import time
import types
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

import losses as losses_lib
import output_cache
import utils

KINDS = (output_cache.TEACHER, output_cache.REFERENCE)
USAGE = ("usage: python precompute.py {teacher|reference} <train.py overrides> "
         "{teacher.cache|reference_cache}=<dir>")


def compose(overrides: List[str]):
    """The config train.py would see for these command-line overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(utils.REPO_DIR, "config"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    return cfg


def check(cfg, kind: str, tokenizer) -> str:
    """Validate the run's config (as train.py does) and that loss `cfg.loss` can read a `kind`
    cache; returns the cache directory. Raises ValueError naming the key."""
    import train
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}: {USAGE}")
    path = output_cache.configured(cfg).get(kind)
    if not path:
        raise ValueError(f"name the cache directory: pass {output_cache.CONFIG_KEY[kind]}=<dir> ({USAGE})")
    plain = copy.deepcopy(cfg)
    plain.teacher.cache, plain.reference_cache = None, None  # the cache does not exist yet
    train.validate_config(plain)
    if kind == output_cache.TEACHER:
        problem = output_cache.teacher_cache_problem(cfg, len(tokenizer))
    else:
        need = losses_lib.get_loss(cfg.loss.name).reference_need(cfg.loss)
        problem = (f"loss={cfg.loss.name} reads the reference's full logits (a vocabulary-sized tensor per token), "
                   "which cannot be cached: it runs with the live reference") if need == "logits" \
            else output_cache.reference_cache_problem(cfg)
    if problem:
        raise output_cache.CacheError(f"{output_cache.CONFIG_KEY[kind]}={path}: {problem}")
    return path


class FrozenModels:
    """The frozen model(s) of one cache kind, built as the trainer builds them, and the features
    the loss would read of them for a batch."""

    def __init__(self, cfg, kind: str, tokenizer, device: torch.device):
        import trainers
        self.cfg, self.kind, self.device = cfg, kind, device
        self.spec = losses_lib.get_loss(cfg.loss.name)
        self.second = None
        if kind == output_cache.TEACHER:
            t_tok = trainers.load_tokenizer(cfg.teacher)
            trainers.check_same_tokenizer(tokenizer, t_tok)
            dtype = utils.get_dtype(cfg.teacher.reference_dtype)
            self.model = trainers.build_model(cfg.teacher, t_tok, dtype, cfg.teacher.archive, cfg.seed + 1)
            if self.spec.teacher_reference_need(cfg.loss):
                self.second = trainers.build_model(cfg.teacher, t_tok, dtype, cfg.teacher.reference_archive,
                                                   cfg.seed + 2)
        else:
            self.model = trainers.build_model(cfg.model, tokenizer, utils.get_dtype(cfg.model.reference_dtype),
                                              cfg.model.archive, cfg.seed)
        for m in (self.model, self.second):
            if m is not None:
                trainers.freeze(m).to(device)

    @torch.no_grad()
    def features(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        model_in = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
        labels = inputs["labels"]
        logits = self.model(**model_in).logits
        if self.kind == output_cache.REFERENCE:
            return {"reference_logps": losses_lib.token_logps(logits, labels)}
        out = self.spec.teacher_features(logits, labels, self.cfg.loss)
        del logits
        if self.second is not None:
            out = self.spec.teacher_reference_features(self.second(**model_in).logits, labels, self.cfg.loss, out)
        return out


def run_batches(cfg, tokenizer, split: str):
    """The batches the trainer reads of `split` (one process): BasicTrainer.batch_iterator itself,
    called on the few attributes it reads, so that precompute sees exactly the run's examples."""
    import trainers
    reader = types.SimpleNamespace(cfg=cfg, tokenizer=tokenizer, spec=losses_lib.get_loss(cfg.loss.name),
                                   rank=0, world_size=1)
    return trainers.BasicTrainer.batch_iterator(reader, split)


def precompute(cfg, kind: str, log=print) -> Dict:
    """Write the `kind` cache ("teacher" or "reference") that the run `cfg` names; returns its manifest."""
    import preference_datasets as data
    import trainers
    tokenizer = data.get_tokenizer(cfg.model.tokenizer)
    path = check(cfg, kind, tokenizer)
    spec = losses_lib.get_loss(cfg.loss.name)
    want = cfg.trainer.get("device", "auto")
    device = torch.device("cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    key = output_cache.cache_key(cfg, kind, tokenizer)
    models = FrozenModels(cfg, kind, tokenizer, device)
    writer = output_cache.CacheWriter(path, overwrite=bool(cfg.get("overwrite", False)))
    start, coverage = time.time(), {}
    try:
        for split in ("train", "test"):
            rows = 0
            for batch in run_batches(cfg, tokenizer, split):
                inputs = utils.move_batch(trainers.concatenated_inputs(batch, spec.pairwise), device)
                keys, _ = output_cache.row_keys(inputs["input_ids"], inputs["labels"], inputs["attention_mask"])
                if all(int(k) in writer.seen for k in keys):
                    continue  # a later epoch: nothing new
                rows += writer.add(models.features(inputs), inputs["input_ids"], inputs["labels"],
                                   inputs["attention_mask"])
            coverage[split] = rows
        coverage.update({"seed": cfg.seed, "batch_size": cfg.batch_size, "n_examples": cfg.n_examples,
                         "n_epochs": cfg.n_epochs, "n_eval_examples": cfg.n_eval_examples})
        manifest = writer.finish(key, {"coverage": coverage, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "seconds": round(time.time() - start, 3)})
    except BaseException:
        writer.abort()
        raise
    log(f"{output_cache.CONFIG_KEY[kind]}={path}: {manifest['rows']} rows ({coverage['train']} train, "
        f"{coverage['test']} test), {manifest['tokens']} tokens, {manifest['bytes_per_token']:.1f} bytes a token "
        f"({', '.join(manifest['features'])}), in {manifest['seconds']:.1f} s")
    return manifest


def run(kind: str, overrides: List[str], log=print) -> Dict:
    """The command line's entry point as a function: precompute.run("teacher", [overrides...])."""
    return precompute(compose(overrides), kind, log=log)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in KINDS:
        print(__doc__ + "\n" + USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        run(argv[0], argv[1:])
    except (ValueError, utils.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
