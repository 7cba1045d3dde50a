"""Protein sequences: unconditional generation of a given length, or motif scaffolding (fixed residues, the rest
infilled).

Data: real proteins. By default the sequences pyhmmer ships as package data (`pyhmmer/tests/data/seqs/*.faa`: a
2,100-protein bacterial proteome plus the LuxC and PKSI families); with `family` set and no `data_path`, that
family's FASTA when one ships (e.g. `LuxC`). Any FASTA works via `data_path`. Sequences longer than `max_length`
are cut into consecutive windows. Windows that would break a constraint (non-canonical residues, shorter than
`min_length`, low complexity) are left out, so the ground truth satisfies every constraint by construction. The
train/test split hashes the record id, so every window of a protein lands on the same side.

The canvas is the bare residue string. Unconditional: one free piece, the prompt gives the length. Scaffold: the
motif residues are fixed pieces at their positions and the prompt shows the template with `_` for free residues.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Literal

from ftkit.errors import FtkitError
from ftkit.tasks.base import (
    PLACEHOLDER,
    Example,
    Piece,
    PromptCanvas,
    RewardParts,
    Violation,
    register,
    stratified_means,
)

CANONICAL = "ACDEFGHIKLMNPQRSTVWY"
FASTA_LETTERS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
GAPS = set("-.")
BUILTIN = "pyhmmer"  # the `source` of examples built from pyhmmer's shipped sequences
# `reward`: a family HMM bit score at or above this counts fully (about a confident hit for a 24-96 residue window).
HMM_REWARD_BITS = 20.0


@dataclass(frozen=True)
class Record:
    id: str
    sequence: str
    where: str  # file:line of the header, for messages


def pyhmmer_data_dir() -> Path:
    import pyhmmer  # late: only needed for the built-in data and the HMM metrics

    return Path(pyhmmer.__file__).resolve().parent / "tests" / "data"


def parse_fasta(path: str | Path) -> list[Record]:
    """Read a FASTA file. Gaps (`-`, `.`) are dropped, a terminal `*` (stop) too; `;` lines are comments.
    Errors name the file and line: residues before any header, a header without an id, an invalid character,
    a record without residues, a duplicated id."""
    path = Path(path)
    if not path.is_file():
        raise FtkitError(f"{path}: data file not found")
    records: list[Record] = []
    seen: dict[str, str] = {}
    current_id, current_where, chunks = None, "", []

    def finish() -> None:
        if current_id is None:
            return
        sequence = "".join(chunks)
        if not sequence:
            raise FtkitError(f"{current_where}: record {current_id!r} has no residues")
        records.append(Record(current_id, sequence, current_where))

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FtkitError(f"{path}: not a UTF-8 text file") from None
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        where = f"{path}:{lineno}"
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            finish()
            fields = line[1:].split()
            if not fields:
                raise FtkitError(f"{where}: header without a sequence id")
            current_id, current_where, chunks = fields[0], where, []
            if current_id in seen:
                raise FtkitError(f"{where}: duplicate sequence id {current_id!r} (first at {seen[current_id]})")
            seen[current_id] = where
            continue
        if current_id is None:
            raise FtkitError(f"{where}: residues before the first '>' header")
        if chunks and chunks[-1].endswith("*"):
            raise FtkitError(f"{where}: residues after a stop '*' in record {current_id!r}")
        residues = line.upper()
        for column, ch in enumerate(residues, start=1):
            if ch not in FASTA_LETTERS and ch not in GAPS and not (ch == "*" and column == len(residues)):
                raise FtkitError(f"{where}:{column}: invalid character {ch!r} in record {current_id!r}")
        chunks.append("".join(ch for ch in residues if ch not in GAPS))
    finish()
    if not records:
        raise FtkitError(f"{path}: no FASTA records")
    return [Record(r.id, r.sequence.rstrip("*"), r.where) for r in records]


def is_test_record(record_id: str, test_fraction: float) -> bool:
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def longest_run(seq: str) -> tuple[int, int]:
    """(start, length) of the longest homopolymer run."""
    best, best_start, start = 0, 0, 0
    for i in range(1, len(seq) + 1):
        if i == len(seq) or seq[i] != seq[start]:
            if i - start > best:
                best, best_start = i - start, start
            start = i
    return best_start, best


def shannon_bits(text: str) -> float:
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values()) if n else 0.0


def low_complexity_spans(seq: str, run: int, window: int, min_bits: float) -> list[tuple[str, range]]:
    """Homopolymer runs of >= `run` residues and `window`-long stretches with Shannon entropy below `min_bits`."""
    spans: list[tuple[str, range]] = []
    start = 0
    for i in range(1, len(seq) + 1):
        if i == len(seq) or seq[i] != seq[start]:
            if i - start >= run:
                spans.append((f"run of {i - start} {seq[start]!r}", range(start, i)))
            start = i
    low = [s for s in range(0, len(seq) - window + 1) if shannon_bits(seq[s : s + window]) < min_bits]
    if low:  # merge overlapping low-entropy windows into one span each
        first = prev = low[0]
        for s in low[1:] + [None]:
            if s is None or s > prev + window:
                spans.append((f"entropy < {min_bits} bits", range(first, prev + window)))
                if s is not None:
                    first = s
            if s is not None:
                prev = s
    return spans


def composition(sequences: list[str]) -> dict[str, float]:
    counts = Counter(ch for s in sequences for ch in s if ch in CANONICAL)
    total = sum(counts.values())
    return {aa: counts[aa] / total if total else 0.0 for aa in CANONICAL}


def js_divergence(p: dict[str, float], q: dict[str, float]) -> float:
    """Jensen-Shannon divergence in bits (0 = same composition, 1 = disjoint)."""

    def kl(a: dict[str, float], b: dict[str, float]) -> float:
        return sum(a[k] * math.log2(a[k] / b[k]) for k in a if a[k] > 0)

    m = {k: (p[k] + q[k]) / 2 for k in p}
    return (kl(p, m) + kl(q, m)) / 2


class IdentityIndex:
    """Max identity of a query to a set of reference sequences: 3-mer prefilter, then difflib on the top hits.
    Identity = matched residues (difflib's matching blocks, i.e. an ungapped-block alignment) / the longer length."""

    K = 3

    def __init__(self, references: list[str], candidates: int = 20):
        self.references = references
        self.candidates = candidates
        self.index: dict[str, list[int]] = {}
        for i, ref in enumerate(references):
            for kmer in {ref[j : j + self.K] for j in range(len(ref) - self.K + 1)}:
                self.index.setdefault(kmer, []).append(i)

    def max_identity(self, query: str) -> float:
        if not query or not self.references:
            return 0.0
        shared: Counter[int] = Counter()
        for kmer in {query[j : j + self.K] for j in range(len(query) - self.K + 1)}:
            shared.update(self.index.get(kmer, ()))
        best = 0.0
        # The top candidates by shared k-mers, ties by reference order: Counter.most_common would break them in
        # insertion order, i.e. the query's k-mer set order, which PYTHONHASHSEED changes between processes.
        for i, _ in heapq.nsmallest(self.candidates, shared.items(), key=lambda item: (-item[1], item[0])):
            ref = self.references[i]
            matched = sum(b.size for b in SequenceMatcher(None, query, ref, autojunk=False).get_matching_blocks())
            best = max(best, matched / max(len(query), len(ref)))
        return best


@dataclass(frozen=True)
class ProteinOptions:
    mode: Literal["unconditional", "scaffold"] = "unconditional"
    min_length: int = 24
    max_length: int = 96  # residues; the canvas must hold this many tokens
    # An HMM name from pyhmmer's shipped HMMs (e.g. "LuxC") or a path to an .hmm file: adds hmm_bits/hmm_hit_rate.
    family: str | None = None
    test_fraction: float = 0.1
    motif_segments: int = 2  # scaffold: contiguous fixed segments
    motif_fraction: float = 0.25  # scaffold: share of residues that are fixed
    homopolymer_run: int = 6  # a run this long of one residue is low complexity
    entropy_window: int = 12
    min_entropy_bits: float = 2.0  # a window below this Shannon entropy is low complexity


@register
class ProteinTask:
    name = "protein"
    Options = ProteinOptions

    def __init__(self, options: ProteinOptions | None = None):
        self.options = o = options or ProteinOptions()
        if not 1 <= o.min_length <= o.max_length:
            raise FtkitError("task.options: need 1 <= min_length <= max_length")
        if not 0.0 < o.test_fraction < 1.0:
            raise FtkitError("task.options: test_fraction must be in (0, 1)")
        if o.mode == "scaffold" and not (o.motif_segments >= 1 and 0.0 < o.motif_fraction < 1.0):
            raise FtkitError("task.options: scaffold needs motif_segments >= 1 and motif_fraction in (0, 1)")
        if o.homopolymer_run < 2 or o.entropy_window < 2:
            raise FtkitError("task.options: homopolymer_run and entropy_window must be >= 2")

    # -- data
    def _source_files(self, data_path: str | None) -> list[Path]:
        if data_path:
            return [Path(data_path)]
        seqs = pyhmmer_data_dir() / "seqs"
        family = self.options.family
        if family and (seqs / f"{family}.faa").is_file():
            return [seqs / f"{family}.faa"]
        return sorted(seqs.glob("*.faa"))

    def _windows(self, data_path: str | None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(train, test) lists of (window id, residues)."""
        o = self.options  # only the options that shape windows key the cache (mode, family... do not)
        return _windows_cached(
            tuple(str(p) for p in self._source_files(data_path)),
            o.min_length,
            o.max_length,
            o.test_fraction,
            o.homopolymer_run,
            o.entropy_window,
            o.min_entropy_bits,
        )

    def build_dataset(self, split: str, size: int, seed: int, data_path: str | None = None) -> list[Example]:
        """`train` / `test` (held out by record id), or `all` (every window, e.g. of an `ftkit eval --data` FASTA)."""
        if split not in ("train", "test", "all"):
            raise FtkitError(f"protein: unknown split {split!r} (train, test or all)")
        train, test = self._windows(data_path)
        pool = list(train + test if split == "all" else train if split == "train" else test)
        random.Random(f"protein/{split}/{seed}").shuffle(pool)
        if not pool and size:
            raise FtkitError(
                f"protein: no {split} sequences of {self.options.min_length}-{self.options.max_length} "
                f"canonical residues{' in ' + data_path if data_path else ''}"
            )
        source = data_path or BUILTIN
        return [self._example(wid, seq, source) for wid, seq in pool[:size]]  # all of them if fewer than `size`

    def _example(self, window_id: str, seq: str, source: str) -> Example:
        motif: list[tuple[int, str]] = []
        if self.options.mode == "scaffold":
            motif = self._motif(window_id, seq)
        third = (self.options.max_length - self.options.min_length + 1) / 3
        offset = len(seq) - self.options.min_length
        length_bin = "short" if offset < third else "medium" if offset < 2 * third else "long"
        return Example(
            id=window_id,
            question={"length": len(seq), "motif": motif},
            answer=seq,
            meta={"length_bin": length_bin, "source": source, "mode": self.options.mode},
        )

    def _motif(self, window_id: str, seq: str) -> list[tuple[int, str]]:
        """Deterministic (per window) fixed segments covering about `motif_fraction` of the residues."""
        rng = random.Random(f"motif/{window_id}")
        n = len(seq)
        segments = min(self.options.motif_segments, max(1, n // 8))
        seg_len = max(1, round(n * self.options.motif_fraction / segments))
        slot = n // segments  # one segment per slot keeps them apart and in order
        motif = []
        for s in range(segments):
            length = min(seg_len, slot - 1) if slot > 1 else 1
            start = s * slot + rng.randint(0, max(0, slot - length - 1))
            motif.append((start, seq[start : start + length]))
        return motif

    def to_prompt_canvas(self, example: Example) -> PromptCanvas:
        seq, motif = example.answer, example.question["motif"]
        if not motif:
            prompt = f"Generate a protein sequence of {len(seq)} residues."
            return PromptCanvas(prompt=prompt, pieces=(Piece(seq, False, allowed=CANONICAL),))
        pieces, template, cursor = [], [], 0
        for start, residues in motif:
            if start > cursor:
                pieces.append(Piece(seq[cursor:start], False, allowed=CANONICAL))
                template.append("_" * (start - cursor))
            pieces.append(Piece(residues, True))
            template.append(residues)
            cursor = start + len(residues)
        if cursor < len(seq):
            pieces.append(Piece(seq[cursor:], False, allowed=CANONICAL))
            template.append("_" * (len(seq) - cursor))
        prompt = f"Complete the protein of {len(seq)} residues; replace each _ with a residue.\n{''.join(template)}"
        return PromptCanvas(prompt=prompt, pieces=tuple(pieces))

    def example_from_input(self, text: str) -> Example:
        """A length (`64`: unconditional) or a scaffold template (`MKT____GLL___A`: letters fixed, `_` free)."""
        spec = "".join(text.split())
        o = self.options
        if spec.isdigit():
            length, motif = int(spec), []
        else:
            bad = [(i, ch) for i, ch in enumerate(spec) if ch != "_" and ch.upper() not in CANONICAL]
            if bad:
                i, ch = bad[0]
                raise FtkitError(
                    f"protein input: {ch!r} at position {i + 1} is neither a canonical residue "
                    f"({CANONICAL}) nor _ (a free residue); or give just a length, e.g. 64"
                )
            spec = spec.upper()
            length, motif, i = len(spec), [], 0
            while i < len(spec):
                if spec[i] == "_":
                    i += 1
                    continue
                j = i
                while j < len(spec) and spec[j] != "_":
                    j += 1
                motif.append((i, spec[i:j]))
                i = j
            if "_" not in spec:
                raise FtkitError("protein input: the template has no free residue (_) to generate")
        if not o.min_length <= length <= o.max_length:
            raise FtkitError(
                f"protein input: length {length} is outside this run's [{o.min_length}, {o.max_length}] "
                "(task.options.min_length/max_length)"
            )
        answer = list(PLACEHOLDER * length)
        for start, residues in motif:
            answer[start : start + len(residues)] = residues
        return Example(
            id="input",
            question={"length": length, "motif": motif},
            answer="".join(answer),
            meta={"mode": "scaffold" if motif else "unconditional", "source": "input"},
        )

    # -- checking
    def check(self, example: Example, output: str) -> list[Violation]:
        o = self.options
        out: list[Violation] = []
        bad = tuple(i for i, ch in enumerate(output) if ch not in CANONICAL)
        if bad:
            out.append(Violation("alphabet", f"{len(bad)} character(s) are not canonical residues", bad))
        if not o.min_length <= len(output) <= o.max_length:
            extra = tuple(range(o.max_length, len(output)))
            out.append(Violation("length", f"length {len(output)} not in [{o.min_length}, {o.max_length}]", extra))
        changed = tuple(
            start + k
            for start, residues in example.question["motif"]
            for k, ch in enumerate(residues)
            if start + k >= len(output) or output[start + k] != ch
        )
        if changed:
            out.append(Violation("fixed", f"{len(changed)} fixed residue(s) changed or missing", changed))
        spans = low_complexity_spans(output, o.homopolymer_run, o.entropy_window, o.min_entropy_bits)
        if spans:
            positions = tuple(sorted({p for _, span in spans for p in span}))
            out.append(Violation("low_complexity", "; ".join(d for d, _ in spans), positions))
        return out

    def reward(self, example: Example, output: str) -> RewardParts:
        """`satisfied`: the mean of the per-constraint scores — canonical fraction, length in range (0/1), length as
        the prompt asks (1 - relative error; the range alone lets RL drift to the longest valid output), fixed
        residues kept (fraction), residues outside low-complexity spans (fraction) — and, with a `family`, the family
        HMM's bit score clipped to [0, HMM_REWARD_BITS] and scaled to [0, 1]. `success` is validity (no violation),
        as in `metrics`."""
        violations = {v.constraint: v for v in self.check(example, output)}
        n = max(1, len(output))
        asked = example.question["length"]
        n_fixed = sum(len(r) for _, r in example.question["motif"])
        parts = [
            sum(ch in CANONICAL for ch in output) / n,
            float("length" not in violations),
            max(0.0, 1.0 - abs(len(output) - asked) / asked),
            1.0 - len(violations["fixed"].positions) / n_fixed if "fixed" in violations else 1.0,
            1.0 - len(violations["low_complexity"].positions) / n if "low_complexity" in violations else 1.0,
        ]
        if self.options.family:
            bits, _ = hmm_scores(self.options.family, ["".join(ch for ch in output if ch in CANONICAL)])
            parts.append(min(max(bits[0], 0.0), HMM_REWARD_BITS) / HMM_REWARD_BITS)
        return RewardParts(sum(parts) / len(parts), float(not violations))

    def metrics(self, examples: list[Example], outputs: list[str]) -> dict[str, float]:
        if not examples:
            return {}
        rows = [(self._one(ex, out), ex.meta.get("length_bin")) for ex, out in zip(examples, outputs)]
        result = stratified_means(rows, ["short", "medium", "long"])
        result.update(self._set_metrics(examples, outputs))
        return result

    def _one(self, example: Example, output: str) -> dict[str, float]:
        violated = {v.constraint for v in self.check(example, output)}
        motif = example.question["motif"]
        n_fixed = sum(len(r) for _, r in motif)
        kept = sum(1 for s, r in motif for k, ch in enumerate(r) if s + k < len(output) and output[s + k] == ch)
        return {
            "validity": float(not violated),
            "canonical_fraction": sum(ch in CANONICAL for ch in output) / max(1, len(output)),
            "length_ok": float("length" not in violated),
            "length_exact": float(len(output) == example.question["length"]),
            "fixed_preserved": kept / n_fixed if n_fixed else 1.0,
            "low_complexity_free": float("low_complexity" not in violated),
        }

    def _set_metrics(self, examples: list[Example], outputs: list[str]) -> dict[str, float]:
        """Metrics against the training distribution: composition divergence, novelty, and the family HMM."""
        source = examples[0].meta.get("source", BUILTIN)
        # Examples from a user FASTA compare with that file's train split; any other origin with the built-in data.
        train, _ = self._windows(source if source != BUILTIN and Path(source).is_file() else None)
        train_seqs = [s for _, s in train]
        generated = ["".join(ch for ch in o if ch in CANONICAL) for o in outputs]
        result = {"composition_js": js_divergence(composition(generated), composition(train_seqs))}
        index = _identity_index(tuple(train_seqs))
        result["novelty"] = sum(1.0 - index.max_identity(s) for s in generated) / len(generated)
        if self.options.family:
            bits, hits = hmm_scores(self.options.family, generated)
            result["hmm_bits"] = sum(bits) / len(bits)
            result["hmm_hit_rate"] = sum(hits) / len(hits)
        return result


@functools.lru_cache(maxsize=8)
def _windows_cached(
    files: tuple[str, ...],
    min_length: int,
    max_length: int,
    test_fraction: float,
    run: int,
    window: int,
    min_bits: float,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train: list[tuple[str, str]] = []
    test: list[tuple[str, str]] = []
    for file in files:
        for record in parse_fasta(file):
            side = test if is_test_record(record.id, test_fraction) else train
            seq = record.sequence
            for start in range(0, len(seq), max_length):
                piece = seq[start : start + max_length]
                if len(piece) < min_length or any(ch not in CANONICAL for ch in piece):
                    continue
                if low_complexity_spans(piece, run, window, min_bits):
                    continue
                side.append((f"{record.id}/{start + 1}-{start + len(piece)}", piece))
    return train, test


@functools.lru_cache(maxsize=4)
def _identity_index(references: tuple[str, ...]) -> IdentityIndex:
    return IdentityIndex(list(references))


def find_hmm(family: str) -> Path:
    """An .hmm path, or the shipped HMM named `family` (by file name or by its NAME line)."""
    if family.endswith(".hmm") and Path(family).is_file():
        return Path(family)
    folder = pyhmmer_data_dir() / "hmms" / "txt"
    if (folder / f"{family}.hmm").is_file():
        return folder / f"{family}.hmm"
    for path in sorted(folder.glob("*.hmm")):
        if any(line.split()[1:2] == [family] for line in path.read_text().splitlines() if line.startswith("NAME")):
            return path
    known = ", ".join(sorted(p.stem for p in folder.glob("*.hmm")))
    raise FtkitError(f"task.options.family: no HMM named {family!r} (shipped: {known}; or give an .hmm path)")


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)  # pyhmmer < 0.11 used bytes names


@functools.lru_cache(maxsize=4)
def _load_hmm(family: str):
    from pyhmmer import plan7

    with plan7.HMMFile(find_hmm(family)) as f:
        hmms = list(f)
    hmm = next((h for h in hmms if _text(h.name) == family), hmms[0])
    if hmm.alphabet.type != "amino":
        raise FtkitError(f"task.options.family: HMM {family!r} is not a protein HMM")
    return hmm


def hmm_scores(family: str, sequences: list[str]) -> tuple[list[float], list[bool]]:
    """Per sequence: hmmsearch bit score against the family HMM (0 when not reported or empty), and whether it is an
    included hit (E <= 0.01 with Z = 1, i.e. as if each sequence were searched alone). Filters are off so every
    sequence is scored."""
    import pyhmmer
    from pyhmmer import easel

    hmm = _load_hmm(family)
    digital = [
        easel.TextSequence(name=str(i).encode(), sequence=s).digitize(hmm.alphabet)
        for i, s in enumerate(sequences)
        if s
    ]
    bits, hits = [0.0] * len(sequences), [False] * len(sequences)
    if digital:
        block = easel.DigitalSequenceBlock(hmm.alphabet, digital)
        top = next(
            iter(pyhmmer.hmmsearch(hmm, block, cpus=1, Z=1, domZ=1, E=1e9, F1=1.0, F2=1.0, F3=1.0, bias_filter=False))
        )
        for hit in top:
            i = int(_text(hit.name))
            bits[i], hits[i] = float(hit.score), bool(hit.included)
    return bits, hits
