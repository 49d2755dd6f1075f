"""Named data sets (hub sources such as hh, shp, se, dpomix, ultrafeedback, helpsteer2, deita,
and `local`): their converters from rows to examples, reading local files, and loading a
source's split into validated examples (the registry in preference_datasets.py sits on top).

Rows come from the hub (datasets.load_dataset(<hub id>, split=...)) or, for any data
set, from a local copy (data.paths.<name>: a file, or a directory holding one file per
split named after the hub's split, e.g. train_prefs.jsonl). Both go through the same
converter, so a local file in the public schema is loaded exactly like the hub. The
example shape is described in prefkd/data/rows.py.
"""
import hashlib
import json
import os
from functools import lru_cache
from html.parser import HTMLParser
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from prefkd.data.rows import (LOCAL_SUFFIXES, DataError, RowError, conversational_pair, messages, need,
                              pair_example, sft_example, split_conversation, text)


# -- converters: rows -> examples (generators; a RowError marks one bad row) --


def anthropic_prompt(dialogue: str, what: str) -> str:
    """The text up to and including the last '\\n\\nAssistant:' (the DPO repo's HH rule)."""
    i = dialogue.rfind("\n\nAssistant:")
    if i < 0:
        raise RowError(f"{what} has no '\\n\\nAssistant:' turn")
    return dialogue[: i + len("\n\nAssistant:")]


def convert_hh(row: Dict) -> List[Dict]:
    """Anthropic/hh-rlhf {chosen, rejected}: full Human/Assistant dialogues sharing a prefix;
    the prompt ends with the last '\\n\\nAssistant:', as in the DPO repo."""
    chosen, rejected = need(row, "chosen"), need(row, "rejected")
    prompt = anthropic_prompt(chosen, "chosen")
    if not rejected.startswith(prompt):
        raise RowError("rejected does not continue the same dialogue as chosen")
    c, r = chosen[len(prompt):], rejected[len(prompt):]
    return [pair_example(prompt, text(c, "the chosen response"), text(r, "the rejected response"), False)]


def convert_shp(row: Dict) -> List[Dict]:
    """stanfordnlp/SHP: one pair per row, kept when the score ratio is at least 2 (as in the
    DPO repo); labels=1 means A is preferred. Prompt '\\n\\nHuman: <history>\\n\\nAssistant:'."""
    history = need(row, "history")
    a, b = need(row, "human_ref_A"), need(row, "human_ref_B")
    sa, sb, label = (need(row, k, None) for k in ("score_A", "score_B", "labels"))
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (sa, sb)) or label not in (0, 1):
        raise RowError(f"score_A/score_B must be numbers and labels 0 or 1, got {sa!r}, {sb!r}, {label!r}")
    if min(sa, sb) <= 0 or max(sa / sb, sb / sa) < 2:
        return []  # the DPO repo's filter, not an error
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return [pair_example(f"\n\nHuman: {history}\n\nAssistant:", " " + chosen, " " + rejected, False)]


class _HTMLText(HTMLParser):
    """Text of top-level <p> elements and of <code> inside <pre> or at top level, as the DPO
    repo's strip_html_tags keeps them (stdlib only). One difference: text inside inline tags
    of a paragraph (<b>, <a>, <code>) is kept, where the DPO repo drops it."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.stack, self.buf = [], [], None

    def handle_starttag(self, tag, attrs):
        if (tag == "p" and not self.stack) or (tag == "code" and (not self.stack or self.stack == ["pre"])):
            self.buf = []
        self.stack.append(tag)

    def handle_endtag(self, tag):
        while self.stack:
            top = self.stack.pop()
            if top == tag:
                break
        if self.buf is not None and ((tag == "p" and not self.stack) or
                                     (tag == "code" and (not self.stack or self.stack == ["pre"]))):
            body = "".join(self.buf)
            self.parts.append(body if tag == "p" else f"<code>{body}</code>")
            self.buf = None

    def handle_data(self, data):
        if self.buf is not None:
            self.buf.append(data)


def strip_html(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return "\n\n".join(parser.parts)


def convert_se(row: Dict) -> List[Dict]:
    """HuggingFaceH4/stack-exchange-preferences {question, answers[{text, pm_score}]}: every
    pair of answers with different scores, the higher-scored chosen (the DPO repo pairs all
    answers); HTML stripped to paragraphs and code."""
    question = strip_html(need(row, "question"))
    answers = need(row, "answers", list)
    texts, scores = [], []
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or "text" not in a or "pm_score" not in a:
            raise RowError(f"answers[{i}] must have 'text' and 'pm_score'")
        texts.append(" " + strip_html(text(a["text"], f"answers[{i}].text")))
        scores.append(a["pm_score"])
    prompt = f"\n\nHuman: {text(question, 'question (after stripping HTML)')}\n\nAssistant:"
    best = texts[max(range(len(texts)), key=lambda i: scores[i])] if texts else None
    out = []
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if scores[i] != scores[j] and texts[i].strip() and texts[j].strip() and texts[i] != texts[j]:
                win, lose = (i, j) if scores[i] > scores[j] else (j, i)
                out.append(pair_example(prompt, texts[win], texts[lose], False, best))
    return out


def convert_pairs_conversational(row: Dict) -> List[Dict]:
    """argilla/dpo-mix-7k and HuggingFaceH4/ultrafeedback_binarized: chosen and rejected are
    whole conversations (lists of {role, content}) sharing every turn but the last."""
    return [conversational_pair(need(row, "chosen", list), need(row, "rejected", list))]


def convert_deita(row: Dict) -> List[Dict]:
    """HuggingFaceH4/deita-10k-v0-sft {messages}: SFT only; the last assistant turn is the
    target, everything before it the prompt."""
    prompt, target = split_conversation(messages(need(row, "messages", list), "messages"), "messages")
    return [sft_example(prompt, target, True)]


HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def convert_helpsteer2(rows: Iterator[Tuple[str, Dict]]) -> Iterator[Tuple[str, Dict]]:
    """nvidia/HelpSteer2 {prompt, response, helpfulness, ...}: the data set lists two responses
    per prompt in consecutive rows. Each such pair becomes a preference pair with the higher
    `helpfulness` chosen (HelpSteer2's primary attribute); pairs with equal helpfulness are
    dropped (no preference). Yields (where, example or RowError)."""
    pending = None
    for where, row in rows:
        try:
            prompt, response = need(row, "prompt"), need(row, "response")
            score = need(row, "helpfulness", None)
            if not isinstance(score, (int, float)) or isinstance(score, bool):
                raise RowError(f"column 'helpfulness' is {type(score).__name__}, expected a number")
        except RowError as e:
            yield where, e
            pending = None
            continue
        if pending is None or pending[1] != prompt:
            pending = (where, prompt, response, score)
            continue
        _, p, r0, s0 = pending
        pending = None
        if s0 == score:
            continue
        (c, r) = (r0, response) if s0 > score else (response, r0)
        user = [{"role": "user", "content": p}]
        try:
            yield where, pair_example(user, c, r, True)
        except RowError as e:
            yield where, e


def convert_local(row: Dict, opts: Dict) -> List[Dict]:
    """TRL's standard formats, with column names from data.local:
    preference  {prompt, chosen, rejected}: strings, or message lists (the prompt optional:
                chosen/rejected then hold the whole conversation);
    SFT         {messages} or {prompt, completion} (strings or message lists)."""
    col = opts["local"]
    p, c, r, m, comp = col["prompt"], col["chosen"], col["rejected"], col["messages"], col["completion"]
    if c in row or r in row:
        chosen, rejected = row.get(c), row.get(r)
        if c not in row or r not in row:
            raise RowError(f"missing column {(c if c not in row else r)!r} (columns: {sorted(row)}); "
                           f"set data.local.chosen / data.local.rejected to the column names")
        if isinstance(chosen, str) and isinstance(rejected, str):
            return [pair_example(need(row, p), text(chosen, f"column {c!r}"), text(rejected, f"column {r!r}"), False)]
        return [conversational_pair(chosen, rejected, row.get(p))]
    if m in row:
        prompt, target = split_conversation(messages(row[m], f"column {m!r}"), f"column {m!r}")
        return [sft_example(prompt, target, True)]
    if p in row and comp in row:
        prompt, completion = row[p], row[comp]
        if isinstance(prompt, str) and isinstance(completion, str):
            return [sft_example(text(prompt, f"column {p!r}"), text(completion, f"column {comp!r}"), False)]
        conv = messages(prompt, f"column {p!r}") + messages(completion, f"column {comp!r}")
        prompt_msgs, target = split_conversation(conv, "prompt + completion")
        return [sft_example(prompt_msgs, target, True)]
    raise RowError(f"no known format: expected columns {p}/{c}/{r}, {m}, or {p}/{comp} (columns: {sorted(row)}); "
                   "set data.local.<prompt|chosen|rejected|messages|completion> to your column names")


class DataSource:
    """A data set: where its rows come from and how a row becomes examples."""

    def __init__(self, name: str, hub: Optional[str], splits: Dict[str, str], convert: Callable,
                 pairs: bool = True, doc: str = "", grouped: bool = False, hold_out: Optional[str] = None):
        self.name, self.hub, self.splits, self.convert = name, hub, splits, convert
        self.pairs, self.doc, self.grouped, self.hold_out = pairs, doc, grouped, hold_out


SOURCES: Dict[str, DataSource] = {s.name: s for s in [
    DataSource("hh", "Anthropic/hh-rlhf", {"train": "train", "test": "test"}, convert_hh,
           doc="Anthropic Helpful-Harmless; Human/Assistant text kept as is"),
    DataSource("shp", "stanfordnlp/SHP", {"train": "train", "test": "test"}, convert_shp,
           doc="Stanford Human Preferences; score ratio >= 2"),
    DataSource("se", "HuggingFaceH4/stack-exchange-preferences", {"train": "train", "test": "train"}, convert_se,
           hold_out="qid", doc="StackExchange; 1% of questions (by qid hash) held out as test"),
    DataSource("dpomix", "argilla/dpo-mix-7k", {"train": "train", "test": "test"}, convert_pairs_conversational,
           doc="DPO-MIX-7K, the paper's preference data"),
    DataSource("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", {"train": "train_prefs", "test": "test_prefs"},
           convert_pairs_conversational, doc="UltraFeedback binarized"),
    DataSource("helpsteer2", "nvidia/HelpSteer2", {"train": "train", "test": "validation"}, convert_helpsteer2,
           grouped=True, doc="HelpSteer2; consecutive responses to one prompt, higher helpfulness chosen"),
    DataSource("deita", "HuggingFaceH4/deita-10k-v0-sft", {"train": "train_sft", "test": "test_sft"}, convert_deita,
           pairs=False, doc="Deita-10k, the paper's SFT data (SFT only)"),
    DataSource("local", None, {"train": "train", "test": "test"}, None,
           doc="a local file or directory in TRL's standard formats (data.local)"),
]}
SE_TEST_PERCENT = 1


# -- reading rows ------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    import gzip
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        body = f.read()
    return body[3:] if body.startswith(b"\xef\xbb\xbf") else body  # a UTF-8 byte-order mark is not data


def _utf8_problem(line: bytes, e: UnicodeDecodeError) -> str:
    return (f"not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line); "
            "save the file as UTF-8")


def _decode_whole(path: str, body: bytes) -> str:
    """The text of a whole-file format (a JSON array, CSV); a non-UTF-8 byte is a DataError
    naming the file and the line."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = body.count(b"\n", 0, e.start) + 1
        line = body[body.rfind(b"\n", 0, e.start) + 1:]
        e2 = UnicodeDecodeError(e.encoding, line, e.start - (len(body) - len(line)), e.end, e.reason)
        raise DataError(f"{path}: line {line_no}: {_utf8_problem(line, e2)}") from None


def read_rows(path: str) -> Iterator[Tuple[str, object]]:
    """(where, row) of a local file; where = '<path>:<line or row number>' (1-based). A broken
    JSON line (bad JSON, or bytes that are not UTF-8) yields a RowError in place of the row, so
    the caller can name it or skip it; lines are split on '\\n' only (a JSON string may hold
    U+2028)."""
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".json") or base.endswith(".jsonl"):
        body = _read_bytes(path)
        if base.endswith(".json") and body.lstrip().startswith(b"["):  # one JSON array
            try:
                rows = json.loads(_decode_whole(path, body))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: broken JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
            for i, row in enumerate(rows, 1):
                yield f"{path}: row {i}", row
            return
        for i, raw in enumerate(body.split(b"\n"), 1):  # JSON lines
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}: line {i}", RowError(_utf8_problem(raw, e))
                continue
            try:
                yield f"{path}: line {i}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}: line {i}", RowError(f"broken JSON ({e.msg} at column {e.colno})")
    elif base.endswith(".parquet"):
        import pyarrow.parquet as pq
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}: row {i}", row
    elif base.endswith(".csv"):
        import csv
        import io
        body = _decode_whole(path, _read_bytes(path))
        for i, row in enumerate(csv.DictReader(io.StringIO(body, newline="")), 2):  # line 1 is the header
            yield f"{path}: line {i}", row
    else:
        raise DataError(f"{path}: unsupported file type; use one of {LOCAL_SUFFIXES}")


def _data_files(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(LOCAL_SUFFIXES)
                  and os.path.isfile(os.path.join(folder, n)))


def _named_file(spec: str, folder: Optional[str], key: str) -> str:
    """data.local.train / data.local.test: a file path (relative to data.local.path when that
    is a directory, else to the working directory), or a file stem inside that directory
    (`train_prefs` -> train_prefs.jsonl)."""
    spec = os.path.expanduser(str(spec))
    candidates = [os.path.join(folder, spec)] if folder and not os.path.isabs(spec) else []
    candidates.append(os.path.abspath(spec))
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    if folder:
        stems = [n for n in _data_files(folder) if n.split(".")[0] == spec]
        if len(stems) == 1:
            return os.path.join(folder, stems[0])
    where = f" (looked in {folder} and the working directory)" if folder else ""
    raise DataError(f"{key}={spec}: no such file{where}")


TEST_NAMES = ("test", "validation", "valid", "val", "dev", "eval")


def sibling_test_files(path: str) -> List[str]:
    """Files beside a single data file that look like its test split: the name with `train`
    replaced by test / validation / val / dev / eval (`train.jsonl` -> `test.jsonl`,
    `sft_train.jsonl` -> `sft_test.jsonl`)."""
    folder, name = os.path.split(path)
    if "train" not in name:
        return []
    head, _, tail = name.rpartition("train")
    stems = {(head + t + tail).split(".")[0] for t in TEST_NAMES}
    return [os.path.join(folder, n) for n in _data_files(folder) if n.split(".")[0] in stems]


HOLDOUT = "holdout"


def _split_files(folder: str, src: DataSource, split: str) -> List[str]:
    names = _data_files(folder)
    for stem in dict.fromkeys((src.splits[split], split)):
        found = [os.path.join(folder, n) for n in names if n.split(".")[0] == stem]
        if found:
            return found
    hint = (f"; name the file with data.local.{split}=<file>" +
            (f" (or data.local.test={HOLDOUT} to hold out data.test_fraction of the train prompts)"
             if split == "test" else "")) if src.name == "local" else ""
    raise DataError(f"{folder}: no file for split {split!r} (expected {src.splits[split]}.jsonl/.json/.parquet/"
                    f".csv; found {names[:10]}){hint}")


def split_plan(src: DataSource, split: str, opts: Dict) -> Dict:
    """Where the rows of one split come from, without reading them: {"hub": "<id>[<split>]"},
    or {"files": [paths], "holdout": the files are split by prompt hash (data.test_fraction
    of the prompts to test), "unread": data files of the directory that feed neither split,
    "note": a warning or None}.

    Local rules: data.local.train / data.local.test name a split's file; else a directory
    gives its train.* / test.* files (or the hub's split names), and a single file (the path,
    or a named train file with no test file named) serves both splits by prompt hash."""
    path = local_path(src, opts)
    col = opts["local"] if src.name == "local" else {}
    train_spec, test_spec = col.get("train"), col.get("test")
    if not path and not train_spec:
        return {"hub": f"{src.hub}[{src.splits[split]}]"}
    folder = path if path and os.path.isdir(path) else None
    if path and not folder and not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory")

    def train_files():
        if train_spec:
            return [_named_file(train_spec, folder, "data.local.train")]
        return _split_files(folder, src, "train") if folder else [path]

    single = bool(train_spec) or folder is None  # one file serves train; the test is held out of it by default

    def test_files():
        if test_spec and test_spec != HOLDOUT:
            return [_named_file(test_spec, folder, "data.local.test")], False
        if test_spec == HOLDOUT or single:
            return train_files(), True
        return _split_files(folder, src, "test"), False

    if split == "train":
        files = train_files()
        try:
            holdout = test_files()[1]
        except DataError:
            holdout = False
    else:
        files, holdout = test_files()
    note = None
    if holdout and test_spec is None and not src.hold_out:
        beside = sibling_test_files(files[0])
        if beside:
            key = "data.local.test" if src.name == "local" else f"data.paths.{src.name}=<the directory>"
            note = (f"{files[0]} is split by prompt hash ({float(opts['test_fraction']):g} of its prompts are the "
                    f"test split), but {', '.join(os.path.basename(b) for b in beside)} lies beside it: to test on "
                    f"it pass {key}" + (f"={os.path.basename(beside[0])}" if src.name == "local" else "") +
                    (f" (data.local.test={HOLDOUT} keeps the hash split and silences this)"
                     if src.name == "local" else ""))
    unread = []
    if folder:
        used = set(files)
        for other in (train_files, lambda: test_files()[0]):
            try:
                used.update(other())
            except DataError:
                pass
        unread = [n for n in _data_files(folder) if os.path.join(folder, n) not in used]
    return {"files": files, "holdout": holdout, "unread": unread, "note": note}


def hub_rows(hub: str, split: str) -> Iterator[Tuple[str, object]]:
    import datasets
    ds = datasets.load_dataset(hub, split=split)
    for i, row in enumerate(ds):
        yield f"{hub}[{split}]: row {i + 1}", row


def local_path(src: DataSource, opts: Dict) -> Optional[str]:
    path = opts["local"]["path"] if src.name == "local" else (opts.get("paths") or {}).get(src.name)
    if src.name == "local" and not path and not opts["local"].get("train"):
        raise DataError("datasets=[local] needs data.local.path=<file or directory> (or data.local.train=<file>)")
    return os.path.abspath(os.path.expanduser(str(path))) if path else None


def source_fingerprint(src: DataSource, split: str, opts: Dict) -> str:
    """What the examples of `split` are made from: the hub id and split, or the local files
    with their sizes and modification times (a changed file is a new fingerprint), plus the
    options that change the conversion (column names, the held-out share), since the token
    cache is keyed by example index."""
    plan = split_plan(src, split, opts)
    if "hub" in plan:
        return plan["hub"]
    files = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in plan["files"]]
    extra = [opts["local"] if src.name == "local" else None, plan["holdout"] and float(opts["test_fraction"])]
    return json.dumps([files, extra], sort_keys=True)


def source_rows(src: DataSource, split: str, opts: Dict) -> Tuple[Iterator[Tuple[str, object]], bool]:
    """(rows, holdout): the rows of `split`, and whether they must still be split into train
    and test by prompt hash."""
    plan = split_plan(src, split, opts)
    if "hub" in plan:
        return hub_rows(src.hub, src.splits[split]), False
    return (item for f in plan["files"] for item in read_rows(f)), plan["holdout"]


def _hash_percent(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10000 / 100.0


def convert_rows(src: DataSource, rows: Iterator[Tuple[str, object]], opts: Dict) -> Iterator[Tuple[str, object]]:
    """(where, example or RowError) for every example of every row."""
    for where, row in rows:
        if isinstance(row, RowError):
            yield where, row
            continue
        if not isinstance(row, dict):
            yield where, RowError(f"a row must be an object with named columns, got {type(row).__name__}")
            continue
        try:
            out = convert_local(row, opts) if src.name == "local" else src.convert(row)
        except RowError as e:
            yield where, e
            continue
        for ex in out:
            ex["key"] = str(row.get("qid", "")) if src.hold_out else None
            yield where, ex


def _prompt_key(ex: Dict) -> str:
    return json.dumps(ex["prompt"], sort_keys=True)


def _load_source(name: str, split: str, opts: Dict):
    """(examples, problems, fingerprint, rows read), memoised per process while the source is unchanged."""
    fingerprint = source_fingerprint(SOURCES[name], split, opts)
    return _load_source_cached(name, split, json.dumps(opts, sort_keys=True), fingerprint)


@lru_cache(maxsize=32)
def _load_source_cached(name: str, split: str, opts_json: str, fingerprint: str):
    opts = json.loads(opts_json)
    src = SOURCES[name]
    rows, whole_file = source_rows(src, split, opts)
    n_rows = [0]

    def counted(items):
        for item in items:
            n_rows[0] += 1
            yield item

    rows = counted(rows)
    if src.grouped:  # bad rows must still be named: check them on the way in
        rows = list(rows)
        broken = [(w, r) for w, r in rows if isinstance(r, RowError)]
        items = broken + list(src.convert((w, r) for w, r in rows if isinstance(r, dict)))
        items += [(w, RowError(f"a row must be an object, got {type(r).__name__}"))
                  for w, r in rows if not isinstance(r, (dict, RowError))]
    else:
        items = list(convert_rows(src, rows, opts))
    examples, problems = [], []
    for where, item in items:
        if isinstance(item, RowError):
            problems.append(f"{where}: {item}")
            continue
        item["where"] = where
        if src.hold_out:  # one hub split serves both: hold out SE_TEST_PERCENT of questions
            in_test = _hash_percent(item.pop("key")) < SE_TEST_PERCENT
            if in_test != (split == "test"):
                continue
        else:
            item.pop("key", None)
            if whole_file:  # one local file serves both: hold out prompts by hash
                in_test = _hash_percent(_prompt_key(item)) < 100 * float(opts["test_fraction"])
                if in_test != (split == "test"):
                    continue
        examples.append(item)
    return examples, problems, fingerprint, n_rows[0]
