"""Text prompts in, text completions out (``moe-hpc generate --prompts prompts.jsonl``).

The prompt file is JSON Lines: one object ``{"prompt": "..."}`` per line (other keys are
ignored). Blank lines (only whitespace) are skipped, so a trailing newline or a blank separator
is harmless; the completions file has one line per prompt, in the prompts' order, each echoing
its prompt. A line that is not a JSON object, has no string ``"prompt"``, an empty prompt, or
one that tokenises to nothing is one error naming the file and the line number.

Text becomes token ids through the checkpoint's ``tokenizer.json`` and Hugging Face's
``tokenizers`` library (the optional extra ``moe_hpc[text]``), with the special tokens its
post-processor adds (the BOS of Llama-style checkpoints; none for Qwen's). The ids go into the
project's ``moe_hpc.input/1`` layout (``/tokens`` padded with 0, ``/lengths``), in memory or as
an input file written atomically; completions are decoded without special tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..config.errors import InputError, MoeHpcError, OutputError
from .atomic import atomic_path, write_text_atomic
from .batches import INPUT_FORMAT
from .h5 import short_reason

TOKENIZER_FILE = "tokenizer.json"
TEXT_EXTRA = "pip install 'moe_hpc[text]'"
# /finish_reason's codes (SPEC.md, "Generation") as the completions file spells them
FINISH_REASONS = ("eos", "max_new_tokens", "max_positions")


@dataclass(frozen=True)
class Prompt:
    text: str
    line: int                 # 1-based line in the prompt file, for messages


@dataclass(frozen=True)
class TokenBatch:
    """Tokenised prompts in the input file's layout: tokens [S, L] int64 (padding 0), lengths [S] int64."""
    tokens: np.ndarray
    lengths: np.ndarray


# ---------------------------------------------------------------- reading prompts

def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSON Lines file, in order; InputError naming the file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the prompt file ({exc.strerror or short_reason(exc)})") from None
    prompts = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if line.strip():
            prompts.append(Prompt(_prompt_of(line, f"{path}:{number}"), number))
    if not prompts:
        raise InputError(f"{path}: no prompts (expected one {{\"prompt\": \"...\"}} object per line)")
    return prompts


def _prompt_of(line: bytes, where: str) -> str:
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not a JSON object ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a JSON object {{\"prompt\": \"...\"}}, got {type(value).__name__}")
    if "prompt" not in value:
        raise InputError(f"{where}: missing key \"prompt\"")
    text = value["prompt"]
    if not isinstance(text, str):
        raise InputError(f"{where}: \"prompt\" must be a string, got {type(text).__name__}")
    if not text:
        raise InputError(f"{where}: empty prompt")
    return text


# ---------------------------------------------------------------- the tokenizer

def find_tokenizer(folder: str | Path) -> Path:
    """The checkpoint folder's tokenizer.json; InputError naming the folder when it has none."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"{folder}: no {TOKENIZER_FILE} in the checkpoint folder; --prompts needs the "
                         "checkpoint's tokenizer (or give an HDF5 token batch with --input)")
    return path


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json; clear errors when the library or the file is bad."""
    try:
        from tokenizers import Tokenizer       # optional: only text prompts need it
    except ImportError:
        raise MoeHpcError(f"--prompts needs Hugging Face's tokenizers library: {TEXT_EXTRA}") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:                   # the library raises a bare Exception for a bad file
        raise InputError(f"{path}: cannot read the tokenizer ({short_reason(exc)})") from None


def tokenize(tokenizer, prompts: list[Prompt], source: str | Path, vocab_size: int = 0) -> list[np.ndarray]:
    """Each prompt's ids [n] int64, with the special tokens the tokenizer's post-processor adds.

    InputError naming ``source`` and the line for a prompt that gives no ids, or an id outside
    [0, vocab_size) when ``vocab_size`` is given (a tokenizer of another model).
    """
    encodings = tokenizer.encode_batch([p.text for p in prompts], add_special_tokens=True)
    out = []
    for prompt, encoding in zip(prompts, encodings):
        ids = np.asarray(encoding.ids, np.int64)
        where = f"{source}:{prompt.line}"
        if len(ids) == 0:
            raise InputError(f"{where}: the prompt gives no tokens")
        if vocab_size and ids.max() >= vocab_size:
            raise InputError(f"{where}: token id {ids.max()} is outside the model's vocabulary "
                             f"[0, {vocab_size}); is tokenizer.json the checkpoint's own?")
        out.append(ids)
    return out


def token_batch(sequences: list[np.ndarray]) -> TokenBatch:
    """Ragged id lists -> the input layout, padded with 0 to the longest."""
    lengths = np.array([len(s) for s in sequences], np.int64)
    tokens = np.zeros((len(sequences), int(lengths.max())), np.int64)
    for row, ids in enumerate(sequences):
        tokens[row, :len(ids)] = ids
    return TokenBatch(tokens, lengths)


def write_token_batch(path: str | Path, batch: TokenBatch) -> None:
    """The batch as a ``moe_hpc.input/1`` file (``/tokens``, ``/lengths``), all or nothing."""
    try:
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = INPUT_FORMAT
            f.create_dataset("tokens", data=batch.tokens)
            f.create_dataset("lengths", data=batch.lengths)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the token batch ({exc.strerror or short_reason(exc)})") from None


def read_token_prompts(prompts_path: str | Path, checkpoint_folder: str | Path,
                       vocab_size: int = 0) -> tuple[list[Prompt], TokenBatch, object]:
    """``--prompts`` end to end: (prompts, their token batch, the tokenizer for decoding)."""
    prompts = read_prompts(prompts_path)
    tokenizer = load_tokenizer(find_tokenizer(checkpoint_folder))
    return prompts, token_batch(tokenize(tokenizer, prompts, prompts_path, vocab_size)), tokenizer


def prompt_batch_path(output: str | Path) -> Path:
    """Where ``generate --prompts`` keeps the tokenised prompts as its input: ``<output>.prompts.h5``
    beside the output (kept while a partial output may be resumed, removed with the finished one)."""
    output = Path(output)
    return output.with_name(output.name + ".prompts.h5")


def holds_token_batch(path: str | Path, batch: TokenBatch) -> bool:
    """``path`` is a readable input file with exactly these tokens and lengths."""
    try:
        with h5py.File(path, "r") as f:
            return (np.array_equal(f["tokens"][()], batch.tokens)
                    and np.array_equal(f["lengths"][()], batch.lengths))
    except (OSError, KeyError):
        return False


def keep_or_write_token_batch(path: str | Path, batch: TokenBatch) -> None:
    """Write the batch unless ``path`` already holds it: a resume's fingerprint includes the input
    file's identity (its mtime), so a rerun with the same prompts must leave the file untouched."""
    if not holds_token_batch(path, batch):
        write_token_batch(path, batch)


# ---------------------------------------------------------------- completions out

def completions_path(output: str | Path) -> Path:
    """Where the text completions go: the output's name with ``.jsonl`` (out.h5 -> out.jsonl)."""
    output = Path(output)
    path = output.with_suffix(".jsonl")
    return path if path != output else output.with_name(output.name + ".out.jsonl")


def decode(tokenizer, generated: np.ndarray, lengths: np.ndarray) -> list[str]:
    """generated [S, N] int, lengths [S] -> each row's valid ids as text, special tokens skipped."""
    rows = [[int(t) for t in generated[s, :int(lengths[s])]] for s in range(len(lengths))]
    return tokenizer.decode_batch(rows, skip_special_tokens=True)


def write_completions(path: str | Path, prompts: list[Prompt], completions: list[str],
                      finish_reasons: np.ndarray) -> None:
    """One ``{"prompt", "completion", "finish_reason"}`` line per prompt, in order, all or nothing
    (durable: it is an output)."""
    lines = [json.dumps({"prompt": p.text, "completion": c, "finish_reason": FINISH_REASONS[int(r)]},
                        ensure_ascii=False)
             for p, c, r in zip(prompts, completions, finish_reasons, strict=True)]
    try:
        write_text_atomic(path, "".join(line + "\n" for line in lines), durable=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the completions ({exc.strerror or short_reason(exc)})") from None


__all__ = ["Prompt", "TokenBatch", "FINISH_REASONS", "TOKENIZER_FILE", "read_prompts", "find_tokenizer",
           "load_tokenizer", "tokenize", "token_batch", "write_token_batch", "read_token_prompts",
           "prompt_batch_path", "holds_token_batch", "keep_or_write_token_batch",
           "completions_path", "decode", "write_completions"]
