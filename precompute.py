"""Run a frozen model once over a run's examples and cache what the loss reads of it.

    python precompute.py teacher   <train.py overrides> teacher.cache=<dir>
    python precompute.py reference <train.py overrides> reference.cache=<dir>

then train with the same overrides (the cache key stays on the command line): the cached model
is not loaded. For example, TVKD with a cached teacher and a cached reference:

    python precompute.py teacher loss=tvkd teacher=tiny_teacher teacher.archive=runs/t/LATEST \
        model.archive=runs/s/LATEST teacher.cache=caches/tvkd_t
    python precompute.py reference loss=tvkd model.archive=runs/s/LATEST reference.cache=caches/ref_s
    python train.py loss=tvkd teacher=tiny_teacher teacher.archive=runs/t/LATEST model.archive=runs/s/LATEST \
        teacher.cache=caches/tvkd_t reference.cache=caches/ref_s

The overrides are train.py's (the same Hydra config), so data sets, tokenisation, lengths and
truncation are exactly the run's. `teacher` stores the dict the loss's ``teacher_features``
(and ``teacher_reference_features``, e.g. ddpo) return; `reference` the reference's per-token
log-probs. The examples covered are those the run reads: its training plan (``seed``,
``batch_size``, ``n_examples`` / ``n_epochs``) and its held-out plan (``n_eval_examples``);
``n_epochs=1 n_examples=null`` covers a whole train split. A list of seeds, as in a multirun
(``seed=0,1,2``), covers the union of those seeds' plans in one cache (each example once), for
a sweep over seeds that reads one cache; the cached model must then come from a checkpoint
(an ``archive``), not a random initialisation that changes with the seed.

The cache is written to a temporary directory and renamed into place at the end
(``overwrite=true`` replaces an existing one; ``--if-needed`` keeps an existing cache whose key
matches and whose recorded plans include the requested ones, and replaces any other); its key
and layout are described in prefkd/output_cache.py. The models run in one process (GPU if available,
in their ``reference_dtype``); with ``trainer=FSDPTrainer``, one process per GPU (on the CPU
``trainer.cpu_workers``), each with a whole copy of the frozen model(s), computes its share of
the batches (the same rows, and the same values, as one process).
"""
import copy
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)
import preference_datasets as data
import train
import utils
from prefkd import batches, config_compose, loss_spec, models, output_cache, packing, tokenizer_facts
from prefkd.logits import output_logits

KINDS = (output_cache.TEACHER, output_cache.REFERENCE)
USAGE = ("usage: python precompute.py {teacher|reference} <train.py overrides> "
         "{teacher.cache|reference.cache}=<dir> [seed=0,1,...] [--if-needed]")
# The settings that decide which examples a run reads (with the seed): a cache records them per seed.
PLAN_KEYS = ("batch_size", "n_examples", "n_epochs", "n_eval_examples", "eval_batch_size")


def compose(overrides: List[str]):
    """The config train.py would see for these command-line overrides."""
    return config_compose.compose(overrides)


def check(cfg, kind: str, tokenizer) -> str:
    """Validate the run's config (as train.py does) and that loss `cfg.loss` can read a `kind`
    cache; returns the cache directory. Raises ValueError naming the key."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}: {USAGE}")
    path = output_cache.configured(cfg).get(kind)
    if not path:
        raise ValueError(f"name the cache directory: pass {output_cache.CONFIG_KEY[kind]}=<dir> ({USAGE})")
    plain = copy.deepcopy(cfg)
    plain.teacher.cache, plain.reference.cache = None, None  # the cache does not exist yet
    plan = train.validate_config(plain)
    if kind == output_cache.TEACHER:
        problem = plan.spec.teacher_cache_problem(cfg.loss)
    else:
        need = plan.reference
        problem = (f"loss={cfg.loss.name} reads the reference's full logits (a vocabulary-sized tensor per token), "
                   "which cannot be cached: it runs with the live reference") if need == "logits" \
            else output_cache.reference_cache_problem(cfg)
    if problem:
        raise output_cache.CacheError(f"{output_cache.CONFIG_KEY[kind]}={path}: {problem}")
    return path


def frozen_models(cfg, kind: str, tokenizer, device: torch.device) -> "models.FrozenModels":
    """The frozen model(s) of one cache kind, built by the code that builds the trainer's
    (prefkd/models.py), on `device`."""
    spec = loss_spec.get_loss(cfg.loss.name)
    frozen = models.FrozenModels(cfg, spec, tokenizer, roles=(kind,))
    frozen.wrap(lambda model, model_cfg, trainable: model.to(device))
    return frozen


def features(frozen: "models.FrozenModels", kind: str, inputs: Dict[str, torch.Tensor], device,
             packer: Optional["packing.Planner"] = None) -> Dict:
    """What a `kind` cache stores for one batch: the features the loss would read (full logits:
    the cache stores what a run without output chunking computes), on padded rows or, with a
    `packer` (padding_free=true), on packed ones (the same numbers)."""

    def logits(model, model_in):
        return output_logits(model, model_in, chunk=False, packing=packer.of(model_in) if packer else None)
    if kind == output_cache.REFERENCE:
        return frozen.reference_outputs(inputs, logits, device)
    return frozen.teacher_features(inputs, logits, device)


def run_batches(cfg, tokenizer, split: str):
    """The batches the trainer reads of `split` (one process), by the trainer's own rule."""
    return data.run_batches(cfg, tokenizer, loss_spec.get_loss(cfg.loss.name), split)


def plans_of(cfg, seeds: List[int]) -> List[Dict]:
    """The example plans of `cfg` run with each of `seeds`: what a cache must cover."""
    return [{"seed": int(s), **{k: cfg.get(k) for k in PLAN_KEYS}} for s in seeds]


def up_to_date(path: str, kind: str, key: Dict, plans: List[Dict]) -> Optional[Dict]:
    """The manifest of the finished cache at `path` if its key is `key` and it covers `plans`."""
    if not os.path.isfile(os.path.join(path, output_cache.MANIFEST)):
        return None
    try:
        cache = output_cache.FeatureCache(path, kind)
    except output_cache.CacheError:
        return None
    covered = cache.manifest.get("coverage", {}).get("plans", [])
    same = not output_cache.describe_differences(cache.manifest["key"], key)
    return cache.manifest if same and all(p in covered for p in plans) else None


def check_seeds(cfg, kind: str, seeds: List[int]) -> None:
    """Several seeds share one cache only if the cached model does not change with the seed."""
    if len(seeds) < 2:
        return
    model, archive = (cfg.teacher, "teacher.archive") if kind == output_cache.TEACHER else (cfg.model, "model.archive")
    if not OmegaConf.select(cfg, archive) and not model.get("name_or_path"):
        raise ValueError(f"seed={','.join(map(str, seeds))}: the {kind} model is randomly initialised with each "
                         f"run's seed (no {archive}), so each seed needs its own cache: precompute one per seed, "
                         f"or give {archive}")
    if kind == output_cache.TEACHER and loss_spec.get_loss(cfg.loss.name).teacher_reference_need(cfg.loss) \
            and not cfg.teacher.get("reference_archive") and not model.get("name_or_path"):
        raise ValueError(f"seed={','.join(map(str, seeds))}: the teacher's reference is randomly initialised with "
                         "each run's seed (no teacher.reference_archive): precompute one cache per seed")


def device_for(cfg, rank: int = 0) -> torch.device:
    """This process's device (models.pick_device), made the current CUDA device."""
    device = models.pick_device(cfg, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def compute_rows(cfg, kind: str, tokenizer, seeds: List[int], writer, device: torch.device, rank: int = 0,
                 world: int = 1) -> Dict[str, int]:
    """Run the frozen model(s) over the batches of every seed's plan and add each row the first time
    it occurs to `writer`; returns the rows added per split. With `world` processes, process
    `rank` computes the batches i with i % world == rank, and every process follows which rows
    the earlier batches held, so the processes compute disjoint rows, exactly those of one process."""
    spec = loss_spec.get_loss(cfg.loss.name)
    frozen = frozen_models(cfg, kind, tokenizer, device)
    packer = packing.Planner(cfg.get("padding_free", False), cfg.max_length)  # processes run apart: no sync
    seen, counts, index = set(), {"train": 0, "test": 0}, 0
    for seed in seeds:
        cfg.seed = seed
        for split in ("train", "test"):
            for batch in run_batches(cfg, tokenizer, split):
                mine, index = index % world == rank, index + 1
                inputs = batches.concatenated_inputs(batch, spec.pairwise, tokenizer_facts.pad_id(tokenizer))
                if kind == output_cache.TEACHER:  # the teacher's rows: its own tokens when its tokenizer differs
                    inputs = frozen.teacher_inputs(batch, inputs)
                keys = output_cache.row_keys(inputs["input_ids"], inputs["labels"], inputs["attention_mask"])[0]
                keys = keys.tolist()
                new = [i for i, k in enumerate(keys) if k not in seen and k not in keys[:i]]
                seen.update(keys)
                if not new or not mine:
                    continue  # a later epoch or another seed's plan (nothing new), or another process's batch
                if len(new) < len(keys):  # only the rows not stored yet (each row's features are its own)
                    inputs = {k: v[new] for k, v in inputs.items()}
                inputs = utils.move_batch(inputs, device)
                counts[split] += writer.add(features(frozen, kind, inputs, device, packer), inputs["input_ids"], inputs["labels"],
                                            inputs["attention_mask"])
    return counts


def part_worker(rank: int, world: int, cfg_container: Dict, kind: str, seeds: List[int], parts: str, key: Dict):
    """One process of a parallel precompute: its rows into the finished cache `<parts>/<rank>`."""
    cfg = OmegaConf.create(cfg_container)
    torch.set_num_threads(int(cfg.num_threads or max(1, (os.cpu_count() or 1) // world)))
    tokenizer = tokenizer_facts.get_tokenizer(cfg.model.tokenizer)
    writer = output_cache.CacheWriter(os.path.join(parts, str(rank)), overwrite=True)
    try:
        counts = compute_rows(cfg, kind, tokenizer, seeds, writer, device_for(cfg, rank), rank, world)
        writer.finish(key, {"coverage": counts})
    except BaseException:
        writer.abort()
        raise


def compute_in_parallel(cfg, kind: str, seeds: List[int], writer, key: Dict, world: int) -> Dict[str, int]:
    """`world` processes compute disjoint rows into caches of their own, appended to `writer`."""
    parts = f"{writer.path}.parts-{os.getpid()}"
    shutil.rmtree(parts, ignore_errors=True)
    os.makedirs(parts)
    try:
        try:
            mp.start_processes(part_worker, nprocs=world, join=True, start_method="spawn",
                               args=(world, OmegaConf.to_container(cfg, resolve=True), kind, seeds, parts, key))
        except mp.ProcessRaisedException as e:
            last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
            raise utils.RunError(f"a precompute process failed: {last}") from None
        counts = {"train": 0, "test": 0}
        for rank in range(world):
            part = output_cache.FeatureCache(os.path.join(parts, str(rank)), kind)
            writer.append(part)
            for split in counts:
                counts[split] += part.manifest["coverage"][split]
        return counts
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def precompute(cfg, kind: str, log=print, seeds: Optional[List[int]] = None, if_needed: bool = False) -> Dict:
    """Write the `kind` cache ("teacher" or "reference") that the run `cfg` names, covering the
    examples of `cfg` run with each of `seeds` (default: cfg.seed); returns its manifest. With
    `if_needed`, an existing cache with the same key that covers those plans is kept."""
    seeds = [int(cfg.seed)] if seeds is None else [int(s) for s in seeds]
    cfg = copy.deepcopy(cfg)
    cfg.seed = seeds[0]
    tokenizer = tokenizer_facts.get_tokenizer(cfg.model.tokenizer)
    path = check(cfg, kind, tokenizer)
    check_seeds(cfg, kind, seeds)
    key = output_cache.cache_key(cfg, kind, tokenizer)
    plans = plans_of(cfg, seeds)
    if if_needed:
        manifest = up_to_date(path, kind, key, plans)
        if manifest is not None:
            log(f"{output_cache.CONFIG_KEY[kind]}={path}: up to date ({manifest['rows']} rows, "
                f"{manifest['tokens']} tokens; seeds {', '.join(str(p['seed']) for p in plans)}): kept")
            return manifest
    # under trainer=FSDPTrainer, one process per GPU (trainer.cpu_workers on the CPU), each with a
    # whole copy of the frozen model(s): they only run forward, so they are not sharded
    world = train.processes_for(cfg)
    writer = output_cache.CacheWriter(path, overwrite=bool(cfg.get("overwrite", False)) or if_needed)
    start = time.time()
    try:
        if world > 1:
            coverage = compute_in_parallel(cfg, kind, seeds, writer, key, world)
        else:
            coverage = compute_rows(cfg, kind, tokenizer, seeds, writer, device_for(cfg))
        coverage["plans"] = plans
        manifest = writer.finish(key, {"coverage": coverage, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "seconds": round(time.time() - start, 3), "processes": world})
    except BaseException:
        writer.abort()
        raise
    log(f"{output_cache.CONFIG_KEY[kind]}={path}: {manifest['rows']} rows ({coverage['train']} train, "
        f"{coverage['test']} test; seeds {', '.join(map(str, seeds))}), {manifest['tokens']} tokens, "
        f"{manifest['bytes_per_token']:.1f} bytes a token ({', '.join(manifest['features'])}), "
        f"in {manifest['seconds']:.1f} s" + (f" ({world} processes)" if world > 1 else ""))
    return manifest


def split_seeds(overrides: List[str]):
    """(overrides with one seed, the list of seeds or None): `seed=0,1,2` lists a multirun's seeds."""
    seeds, out = None, []
    for o in overrides:
        k, _, v = o.partition("=")
        if k == "seed" and "," in v:
            try:
                seeds = [int(x) for x in v.split(",")]
            except ValueError:
                raise ValueError(f"{o}: seed takes an integer or a comma-separated list of integers") from None
            o = f"seed={seeds[0]}"
        out.append(o)
    return out, seeds


def run(kind: str, overrides: List[str], log=print, if_needed: bool = False) -> Dict:
    """The command line's entry point as a function: precompute.run("teacher", [overrides...])."""
    overrides, seeds = split_seeds(list(overrides))
    return precompute(compose(overrides), kind, log=log, seeds=seeds, if_needed=if_needed)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in KINDS:
        print(__doc__ + "\n" + USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    rest = [a for a in argv[1:] if a != "--if-needed"]
    try:
        run(argv[0], rest, if_needed=len(rest) < len(argv) - 1)
    except (ValueError, utils.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
