"""On-disk caches of frozen models' outputs: the teacher's features and the reference's log-probs.

A loss that reads a frozen model only through small per-token tensors (TVKD's values V(s), 4
bytes a token; the top-K ids and collapsed log-probs of top-K KD; the reference's per-token
log-probs of DPO-style losses) can read them from a cache written once by ``precompute.py``,
so that the training run does not load that model at all.

Layout of a cache directory (written as ``<dir>.tmp-<pid>`` and renamed into place when every
file is on disk, so an interrupted precompute never leaves a directory that looks complete)::

    manifest.json       the key (everything that changes the content, below), the feature
                        schema (name, dtype, trailing shape, positions per row), row and byte counts
    keys.npy            [R] uint64: one per stored row, a hash of its token ids and labels
    lengths.npy         [R] int64: the row's length in tokens (its attention mask's sum)
    <feature>.bin       the feature's per-token values of every row, concatenated (raw, C order),
                        read through numpy.memmap: each rank reads only the rows it trains on

A *row* is one sequence the trainer feeds the models (prompt + one response, right-padded in a
batch): it is looked up by the hash of its ids and labels, so a row is found whatever batch,
rank or padding it arrives in. A feature whose dim 1 is the batch width L stores a row's first
``length`` positions; one whose dim 1 is L - 1 (shifted indexing, losses.py) its first
``length - 1``. Padding positions are filled with the row's last stored position on lookup
(the losses mask them out; this keeps top-K ids distinct and values finite there).

The key. A cache is valid for a run only if everything that changes its content matches:
the loss and its feature settings (``LossSpec.teacher_feature_settings``, e.g. tvkd's potential
and value temperature, ``top_k``), the frozen model(s) (a content fingerprint of the
checkpoint's weights, see ``weights_fingerprint``), their dtype, the tokenizer, the data sets
and their sources, the data options that change examples, ``max_length``,
``max_prompt_length`` and ``truncation_mode``. A mismatch is a ``CacheMismatch`` naming each
differing config key, never silently stale data. Which examples are stored (the seed,
``n_examples``...) is not part of the key: a row that is missing is an error at lookup.
"""
import hashlib
import json
import os
import shutil
from typing import Dict, List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

import utils
from prefkd import checkpoints, cross_tokenizer
from prefkd import models
from prefkd import loss_spec
from prefkd.data import loading as data_loading
from prefkd.data import encoding
from prefkd import adapters

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
TEACHER, REFERENCE = "teacher", "reference"
# The config key that names each kind of cache.
CONFIG_KEY = {TEACHER: "teacher.cache", REFERENCE: "reference.cache"}
# Data options that do not change the examples (where they are cached, how they are checked/scored).
DATA_OPTIONS_NEUTRAL = ("cache_dir", "check_lengths", "scorer", "allow_mixed_formats")


class CacheError(ValueError):
    """A cache cannot be used or written: the message names the key or file and what to do."""


class CacheMismatch(CacheError):
    """A cache was computed with other settings than the run's."""


# ------------------------------------------------------------------ fingerprints

def weights_fingerprint(path: str, n_blocks: int = 16, block: int = 1 << 16) -> str:
    """A content fingerprint of the weight files of a model directory, cheap for any size.

    For each *.safetensors (else *.bin / *.pt) file: its name, size, full header (tensor names,
    shapes, dtypes, offsets) and ``n_blocks`` blocks of ``block`` bytes spread evenly over its
    data, plus its last block. Any training step changes essentially every weight, so a
    retrained or different checkpoint changes the fingerprint, while a copy of the same files
    (another path or mtime) keeps it. Plus config.json (the architecture)."""
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    names = names or sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt")) and n != "optimizer.pt")
    if not names:
        raise CacheError(f"no weight files (*.safetensors) in {path}")
    for name in names + (["config.json"] if os.path.isfile(os.path.join(path, "config.json")) else []):
        full = os.path.join(path, name)
        size = os.path.getsize(full)
        h.update(f"{name}:{size}:".encode())
        with open(full, "rb") as f:
            if name == "config.json" or size <= (n_blocks + 2) * block:
                h.update(f.read())
                continue
            start = 0
            if name.endswith(".safetensors"):
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(n))
                start = 8 + n
            span = size - start - block
            for i in range(n_blocks + 1):
                f.seek(start + span * i // n_blocks)
                h.update(f.read(block))
    return h.hexdigest()[:24]


def archive_fingerprint(path: str) -> str:
    """The fingerprint of the effective weights of a checkpoint: its model files, or (an adapter
    directory, prefkd/adapters.py) its adapter's files and config with its base's fingerprint,
    so that a retrained adapter over the same base is a different model."""
    if models.is_model_dir(path):
        return weights_fingerprint(path)
    where = adapters.location(path)
    base = models.adapter_base(path)
    base_print = archive_fingerprint(base) if os.path.isdir(base) else f"hub:{base}"
    with open(os.path.join(where, adapters.CONFIG_FILE), "rb") as f:
        config = hashlib.sha256(f.read()).hexdigest()
    joined = f"{weights_fingerprint(where)}:{config}:{base_print}"
    return hashlib.sha256(joined.encode()).hexdigest()[:24]


def model_fingerprint(model_cfg, archive: Optional[str], seed: int, dtype: str) -> Dict[str, str]:
    """{"weights": fingerprint, "source": where the weights come from, "dtype"} of a frozen model
    built as models.build_model builds it: from `archive`, else `name_or_path`, else randomly
    initialised from `init_config` with `seed`."""
    if archive:
        path = checkpoints.resolve_checkpoint(archive)
        return {"weights": archive_fingerprint(path), "source": path, "dtype": str(dtype)}
    name = model_cfg.get("name_or_path")
    if name:
        local = os.path.isdir(os.path.expanduser(str(name)))
        weights = weights_fingerprint(os.path.expanduser(str(name))) if local else f"hub:{name}"
        return {"weights": weights, "source": str(name), "dtype": str(dtype)}
    init = json.dumps(OmegaConf.to_container(model_cfg.init_config, resolve=True), sort_keys=True)
    return {"weights": f"init:{hashlib.sha256(init.encode()).hexdigest()[:16]}:seed{seed}",
            "source": f"random init of {model_cfg.get('name')} (seed {seed})", "dtype": str(dtype)}


# ------------------------------------------------------------------ what a cache is keyed by

def _data_key(cfg, tokenizer) -> Dict:
    opts = data_loading.data_options(cfg.get("data"))
    for k in DATA_OPTIONS_NEUTRAL:
        opts.pop(k, None)
    if not opts["flip_fraction"]:  # no label noise: the key of a cache written before the option existed
        opts.pop("flip_fraction"), opts.pop("flip_seed")
    sources = {}
    for name in cfg.datasets:
        for split in ("train", "test"):
            sources[f"{name}/{split}"] = data_loading.load_dataset_checked(name, split, cfg.get("data"), silent=True)[1]
    return {"datasets": list(cfg.datasets), "data": json.dumps(opts, sort_keys=True), "data sources": sources,
            "tokenizer": encoding.tokenizer_fingerprint(tokenizer), "max_length": int(cfg.max_length),
            "max_prompt_length": int(cfg.max_prompt_length), "truncation_mode": str(cfg.truncation_mode)}


def feature_settings(loss_cfg) -> Dict:
    """The loss.* settings a loss's teacher features depend on (LossSpec.teacher_feature_settings;
    without it, every loss.* key)."""
    spec = loss_spec.get_loss(loss_cfg.name)
    if spec.teacher_feature_settings is not None:
        return spec.teacher_feature_settings(loss_cfg)
    return OmegaConf.to_container(loss_cfg, resolve=True)


# cache_key results of this process: the start-up check, the trainer (each rank) and precompute
# ask for the same key, which loads every split and fingerprints weights. Keyed by the config,
# the kind and a stamp (path, size, mtime) of every file the key reads, so a retrained archive or
# an edited data file is seen.
_KEYS: Dict[str, Dict] = {}


def _files_stamp(cfg, kind: str) -> str:
    """(path, size, mtime_ns) of the weight files of the models a `kind` cache holds the outputs
    of, and of the local data files."""
    paths = []
    for role in (("teacher", "teacher_reference") if kind == TEACHER else ("reference",)):
        src = models.origin(cfg, role)
        where = checkpoints.resolve_checkpoint(src.archive) if src.archive else src.model_cfg.get("name_or_path")
        if where and os.path.isdir(os.path.expanduser(str(where))):
            d = os.path.expanduser(str(where))
            for sub in (d, os.path.join(d, "adapter")):  # a LoRA checkpoint's adapter too
                if os.path.isdir(sub):
                    paths += [os.path.join(sub, n) for n in sorted(os.listdir(sub)) if n.endswith((".safetensors", ".json"))]
    data_cfg = cfg.get("data") or {}
    for p in [(data_cfg.get("local") or {}).get(k) for k in ("path", "train", "test")] + \
            list((data_cfg.get("paths") or {}).values()):
        if p and os.path.exists(os.path.expanduser(str(p))):
            root = os.path.expanduser(str(p))
            paths += [os.path.join(dp, n) for dp, _, ns in os.walk(root) for n in sorted(ns)] \
                if os.path.isdir(root) else [root]
    return json.dumps([(q, os.path.getsize(q), os.stat(q).st_mtime_ns) for q in paths if os.path.isfile(q)])


def cache_key(cfg, kind: str, tokenizer) -> Dict:
    """Everything that changes the content of a `kind` cache for the run `cfg`, as a flat dict
    {config key (or a description): value}. Model entries are fingerprint dicts. Computed once
    per process for one config and unchanged files (`_KEYS`)."""
    memo = json.dumps([kind, OmegaConf.to_yaml(cfg, resolve=True), _files_stamp(cfg, kind)])
    if memo not in _KEYS:
        _KEYS[memo] = _cache_key(cfg, kind, tokenizer)
    return json.loads(json.dumps(_KEYS[memo]))  # a copy: callers may edit theirs


def _cache_key(cfg, kind: str, tokenizer) -> Dict:
    key = {"format": CACHE_FORMAT, "kind": kind, **_data_key(cfg, tokenizer)}
    if kind == TEACHER:
        spec = loss_spec.get_loss(cfg.loss.name)
        key["loss.name"] = cfg.loss.name
        for k, v in sorted(feature_settings(cfg.loss).items()):
            key[f"loss.{k}"] = v
        teacher_tok = models.load_tokenizer(cfg.teacher)
        if cross_tokenizer.teacher_tokens(cfg, tokenizer, teacher_tok) == "own":
            # rows are the teacher's own tokens of the text (prefkd/cross_tokenizer.py): the
            # teacher's tokenizer and chat template, not the student's, decide them
            key["tokenizer"] = encoding.tokenizer_fingerprint(teacher_tok)
            key["teacher.tokenization"] = "own"
            key["teacher.chat_template"] = cross_tokenizer.template_of(cfg) or "<the teacher tokenizer's own>"
        key["teacher.archive"] = model_fingerprint(*models.origin(cfg, "teacher"))
        if spec.teacher_reference_need(cfg.loss):
            key["teacher.reference_archive"] = model_fingerprint(*models.origin(cfg, "teacher_reference"))
    else:
        key["model.archive"] = model_fingerprint(*models.origin(cfg, "reference"))
    return key


def describe_differences(cached: Dict, now: Dict) -> List[str]:
    """One line per differing key of two cache keys."""
    lines = []
    for k in sorted(set(cached) | set(now)):
        a, b = cached.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict) and "weights" in a and "weights" in b:
            if a["weights"] != b["weights"]:
                lines.append(f"{k}: other weights (the cache was computed from {a['source']}, this run's model is "
                             f"{b['source']}; fingerprints {a['weights']} vs {b['weights']})")
            elif a.get("dtype") != b.get("dtype"):
                lines.append(f"{k}: dtype {a.get('dtype')} in the cache, {b.get('dtype')} now")
        elif a != b:
            lines.append(f"{k}: {a!r} in the cache, {b!r} now")
    return lines


# ------------------------------------------------------------------ which losses can use a cache

def teacher_cache_problem(cfg) -> Optional[str]:
    """Why loss `cfg.loss` cannot read its teacher from a cache (None if it can): the loss's spec
    says (LossSpec.teacher_cache_problem)."""
    return loss_spec.get_loss(cfg.loss.name).teacher_cache_problem(cfg.loss)


def reference_cache_problem(cfg) -> Optional[str]:
    """Why loss `cfg.loss` cannot read its reference from a cache (None if it can)."""
    spec = loss_spec.get_loss(cfg.loss.name)
    need = spec.reference_need(cfg.loss)
    if need is None:
        return f"loss={cfg.loss.name} (with these loss.* settings) reads no reference log-probs"
    if need != "logps":
        return None  # "logits": the live reference is kept (reference_cache_ignored says so)
    gen = spec.generation_need(cfg.loss)
    if gen is not None:
        return (f"loss={cfg.loss.name} trains on responses generated during the run: their reference log-probs "
                "cannot be precomputed")
    return None


def reference_cache_ignored(cfg) -> Optional[str]:
    """The note printed when a reference cache is set for a loss that needs the reference's full
    logits (tdpo): the live reference model is loaded instead."""
    spec = loss_spec.get_loss(cfg.loss.name)
    if cfg.reference.get("cache") and spec.reference_need(cfg.loss) == "logits":
        return (f"note: reference.cache={cfg.reference.cache} is not used: loss={cfg.loss.name} reads the "
                "reference's full logits ([N, L, V]: a vocabulary-sized tensor per token), which cannot be "
                "cached; the live reference model is loaded")
    return None


def configured(cfg) -> Dict[str, str]:
    """{kind: directory} of the caches the config names."""
    out = {}
    if cfg.teacher.get("cache"):
        out[TEACHER] = str(cfg.teacher.cache)
    if cfg.reference.get("cache"):
        out[REFERENCE] = str(cfg.reference.cache)
    return out


def check_config(cfg, tokenizer, check_exists: bool = True) -> None:
    """Refuse a cache the loss cannot use and (check_exists) a cache that is missing or was
    computed with other settings. Raises CacheError naming the key. Called by train.py's
    validation (before any model is loaded) and by precompute.py (check_exists=False)."""
    dirs = configured(cfg)
    if TEACHER in dirs:
        problem = teacher_cache_problem(cfg)
        if problem:
            raise CacheError(f"teacher.cache={dirs[TEACHER]}: {problem}")
    if REFERENCE in dirs:
        problem = reference_cache_problem(cfg)
        if problem:
            raise CacheError(f"reference.cache={dirs[REFERENCE]}: {problem}")
    if check_exists:
        for kind, path in dirs.items():
            if kind == REFERENCE and reference_cache_ignored(cfg):
                continue
            FeatureCache(path, kind).check(cache_key(cfg, kind, tokenizer))


# ------------------------------------------------------------------ rows

def row_keys(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
    """([N] uint64 keys, [N] lengths) of the rows of a right-padded [N, L] batch: a row's key
    hashes its first `length` ids and labels (length = its attention mask's sum)."""
    ids = input_ids.detach().cpu().to(torch.int64).numpy()
    lab = labels.detach().cpu().to(torch.int64).numpy()
    lengths = attention_mask.detach().cpu().sum(-1).to(torch.int64).numpy()
    keys = np.empty(len(ids), dtype=np.uint64)
    for i, n in enumerate(lengths):
        h = hashlib.blake2b(digest_size=8)
        h.update(np.ascontiguousarray(ids[i, :n]).tobytes())
        h.update(np.ascontiguousarray(lab[i, :n]).tobytes())
        keys[i] = int.from_bytes(h.digest(), "little")
    return keys, lengths


_STORE_DTYPE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                torch.int64: np.int32, torch.int32: np.int32, torch.bool: np.bool_}


class CacheWriter:
    """Writes a cache directory: `add` a batch's features row by row (rows already stored are
    skipped), then `finish` writes the index and manifest and renames the directory into place."""

    def __init__(self, path: str, overwrite: bool = False):
        self.path = os.path.abspath(os.path.expanduser(path))
        if os.path.exists(self.path) and not overwrite:
            raise CacheError(f"{self.path} exists already: remove it, choose another directory, or pass "
                             "overwrite=true to replace it")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.schema: Dict[str, Dict] = {}
        self.files = {}
        self.keys: List[int] = []
        self.lengths: List[int] = []
        self.seen = set()

    def add(self, features: Dict[str, torch.Tensor], input_ids, labels, attention_mask) -> int:
        """Store the rows of one batch; returns how many were new."""
        width = input_ids.shape[1]
        keys, lengths = row_keys(input_ids, labels, attention_mask)
        arrays = {}
        for name, t in features.items():
            if not torch.is_tensor(t) or t.dim() < 2 or t.shape[0] != input_ids.shape[0] \
                    or t.shape[1] not in (width, width - 1):
                raise CacheError(f"feature {name!r} of shape {tuple(getattr(t, 'shape', ()))} is not per position "
                                 f"of the [{input_ids.shape[0]}, {width}] batch: it cannot be cached per token")
            shift = width - t.shape[1]
            store = _STORE_DTYPE.get(t.dtype)
            if store is None:
                raise CacheError(f"feature {name!r} has dtype {t.dtype}, which the cache does not store")
            entry = {"torch_dtype": str(t.dtype).replace("torch.", ""), "store_dtype": np.dtype(store).name,
                     "shape": list(t.shape[2:]), "shift": shift}
            if name not in self.schema:
                self.schema[name] = entry
                self.files[name] = open(os.path.join(self.tmp, f"{name}.bin"), "wb")
            elif self.schema[name] != entry:
                raise CacheError(f"feature {name!r} changed layout between batches: {self.schema[name]} vs {entry}")
            if t.dtype == torch.int64 and t.numel() and (int(t.max()) >= 2 ** 31 or int(t.min()) < -2 ** 31):
                raise CacheError(f"feature {name!r} holds integers beyond int32")
            arrays[name] = t.detach().cpu().numpy().astype(store, copy=False)
        if set(arrays) != set(self.schema):
            raise CacheError(f"the features changed between batches: {sorted(arrays)} vs {sorted(self.schema)}")
        new = 0
        for i, (key, n) in enumerate(zip(keys.tolist(), lengths.tolist())):
            if key in self.seen:
                continue
            self.seen.add(key)
            for name, a in arrays.items():
                self.files[name].write(np.ascontiguousarray(a[i, : n - self.schema[name]["shift"]]).tobytes())
            self.keys.append(key)
            self.lengths.append(n)
            new += 1
        return new

    def append(self, part: "FeatureCache") -> int:
        """Append every row of the finished cache `part` (rows this writer holds already are an
        error: the parts of a parallel precompute are disjoint); returns its row count."""
        part._load_index()
        if self.schema and part.schema != self.schema:
            raise CacheError(f"{part.path}: features {part.schema} differ from {self.schema}")
        keys = np.load(os.path.join(part.path, "keys.npy")).tolist()
        if self.seen.intersection(keys):
            raise CacheError(f"{part.path}: rows already stored by another part")
        for name, entry in part.schema.items():
            if name not in self.files:
                self.schema[name] = entry
                self.files[name] = open(os.path.join(self.tmp, f"{name}.bin"), "wb")
            with open(os.path.join(part.path, f"{name}.bin"), "rb") as f:
                shutil.copyfileobj(f, self.files[name], 1 << 24)
        self.keys += keys
        self.lengths += part._lengths.tolist()
        self.seen.update(keys)
        return len(keys)

    def finish(self, key: Dict, info: Dict) -> Dict:
        """Flush everything, write the manifest last and rename the directory into place."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        np.save(os.path.join(self.tmp, "keys.npy"), np.asarray(self.keys, dtype=np.uint64))
        np.save(os.path.join(self.tmp, "lengths.npy"), np.asarray(self.lengths, dtype=np.int64))
        n_tokens = int(sum(self.lengths))
        sizes = {name: os.path.getsize(os.path.join(self.tmp, f"{name}.bin")) for name in self.schema}
        manifest = {"key": key, "features": self.schema, "rows": len(self.keys), "tokens": n_tokens,
                    "bytes": sizes, "bytes_per_token": sum(sizes.values()) / max(1, n_tokens), **info}
        utils.atomic_write_json(os.path.join(self.tmp, MANIFEST), manifest)
        utils.fsync_dir(self.tmp)
        aside = None
        if os.path.exists(self.path):
            aside = f"{self.path}.old-{os.getpid()}"
            os.replace(self.path, aside)
        os.replace(self.tmp, self.path)
        utils.fsync_dir(os.path.dirname(self.path))
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class FeatureCache:
    """A finished cache directory, opened for reading: `check` its key against a run's, then
    `lookup` the features of a batch's rows."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = os.path.abspath(os.path.expanduser(str(path))), kind
        self.name = f"{CONFIG_KEY[kind]}={path}"
        manifest = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest):
            partial = [n for n in os.listdir(os.path.dirname(self.path) or ".")
                       if n.startswith(os.path.basename(self.path) + ".tmp-")] \
                if os.path.isdir(os.path.dirname(self.path) or ".") else []
            raise CacheError(f"{self.name}: no finished cache at {self.path} (no {MANIFEST}"
                             + (f"; {partial[0]} is an interrupted precompute" if partial else "")
                             + f"): create it with `python precompute.py {kind} <this run's overrides> "
                               f"{CONFIG_KEY[kind]}={path}`")
        with open(manifest) as f:
            self.manifest = json.load(f)
        if self.manifest.get("key", {}).get("kind") != kind:
            raise CacheError(f"{self.name}: {self.path} is a {self.manifest.get('key', {}).get('kind')} cache, "
                             f"not a {kind} cache")
        self.schema = self.manifest["features"]
        self._index = None
        self._maps = {}

    def check(self, key: Dict) -> None:
        diffs = describe_differences(self.manifest["key"], key)
        if diffs:
            raise CacheMismatch(
                f"{self.name} was computed with other settings than this run's:\n  " + "\n  ".join(diffs) +
                f"\nrecompute it for this run (`python precompute.py {self.kind} <this run's overrides> "
                f"{CONFIG_KEY[self.kind]}=<new dir>`), or run without {CONFIG_KEY[self.kind]} (the live model)")

    def _load_index(self):
        keys = np.load(os.path.join(self.path, "keys.npy"))
        lengths = np.load(os.path.join(self.path, "lengths.npy"))
        self._index = {int(k): i for i, k in enumerate(keys.tolist())}
        self._lengths = lengths
        self._offsets = {}
        for name, s in self.schema.items():
            per_row = np.maximum(lengths - s["shift"], 0)
            self._offsets[name] = np.concatenate([[0], np.cumsum(per_row)])
            item = int(np.prod(s["shape"])) if s["shape"] else 1
            n = int(self._offsets[name][-1]) * item
            file = os.path.join(self.path, f"{name}.bin")
            expected = n * np.dtype(s["store_dtype"]).itemsize
            if os.path.getsize(file) != expected:
                raise CacheError(f"{self.name}: {file} has {os.path.getsize(file)} bytes, its manifest says "
                                 f"{expected} (damaged): recompute the cache")
            self._maps[name] = np.memmap(file, dtype=s["store_dtype"], mode="r",
                                         shape=(int(self._offsets[name][-1]), *s["shape"])) if n else \
                np.zeros((0, *s["shape"]), dtype=s["store_dtype"])

    def lookup(self, input_ids, labels, attention_mask, device=None) -> Dict[str, torch.Tensor]:
        """The cached features of a right-padded [N, L] batch, as the live feature functions
        return them: [N, L (or L-1), *shape] tensors of the original dtype."""
        if self._index is None:
            self._load_index()
        keys, lengths = row_keys(input_ids, labels, attention_mask)
        rows = [self._index.get(int(k)) for k in keys]
        missing = sum(r is None for r in rows)
        if missing:
            plans = self.manifest.get("coverage", {}).get("plans") or [self.manifest.get("coverage", {})]
            info = "; ".join(", ".join(f"{k}={v}" for k, v in p.items() if k not in ("train", "test"))
                             for p in plans)
            raise CacheError(
                f"{self.name}: {missing} of the {len(rows)} rows of this batch are not in the cache (it holds "
                f"{self.manifest['rows']} rows: the examples of the runs it was computed for: {info}). Recompute "
                "it with this run's data settings (seed, n_examples / n_epochs, n_eval_examples, batch_size; "
                "n_epochs=1 n_examples=null covers a whole train split; seed=0,1,2 covers several seeds)")
        width = input_ids.shape[1]
        out = {}
        for name, s in self.schema.items():
            n_pos = width - s["shift"]
            arr = np.empty((len(rows), n_pos, *s["shape"]), dtype=s["store_dtype"])
            for i, r in enumerate(rows):
                a, b = int(self._offsets[name][r]), int(self._offsets[name][r + 1])
                n = b - a
                arr[i, :n] = self._maps[name][a:b]
                if n < n_pos:
                    arr[i, n:] = arr[i, n - 1] if n else 0
            t = torch.from_numpy(arr).to(getattr(torch, s["torch_dtype"]))
            out[name] = t.to(device) if device is not None else t
        return out


def open_for_run(cfg, kind: str, tokenizer) -> FeatureCache:
    """The run's `kind` cache, checked against its settings (CacheMismatch otherwise)."""
    cache = FeatureCache(configured(cfg)[kind], kind)
    cache.check(cache_key(cfg, kind, tokenizer))
    return cache
