"""Text prompts and completions (moe_hpc/files/prompts.py).

The tokenizer is a tiny word-level one built by helpers.build_tokenizer with Hugging Face's ``tokenizers`` (the
``test`` extra installs it; the tests that need it skip with the reason when it is missing).
Bad prompt files are unit tests here: each must give one InputError naming the file and line.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from helpers import BOS, EOS, WORDS, build_tokenizer
from moe_hpc.config.errors import InputError, MoeHpcError
from moe_hpc.files.batches import open_input
from moe_hpc.files.prompts import (FINISH_REASONS, Prompt, completions_path, decode, find_tokenizer, load_tokenizer,
                                   read_prompts, read_token_prompts, token_batch, tokenize, write_completions,
                                   write_token_batch)

def write_lines(path, *lines, end="\n"):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + end.encode() for l in lines))
    return path


def test_prompts_in_order_with_blank_lines_skipped(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", '{"prompt": "hello world"}', "", "   ",
                       '{"prompt": "the café", "id": 7}', '{"prompt": "cat"}')
    prompts = read_prompts(path)
    assert prompts == [Prompt("hello world", 1), Prompt("the café", 4), Prompt("cat", 5)]


def test_last_line_without_newline_is_read(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}')
    assert [p.text for p in read_prompts(path)] == ["a", "b"]


@pytest.mark.parametrize("bad, needle", [
    ('{"prompt": "unterminated}', "not a JSON object"),
    ('["hello"]', "expected a JSON object"),
    ('"hello"', "expected a JSON object"),
    ('{"text": "hello"}', 'missing key "prompt"'),
    ('{"prompt": 3}', '"prompt" must be a string, got int'),
    ('{"prompt": null}', '"prompt" must be a string, got NoneType'),
    ('{"prompt": ""}', "empty prompt"),
    (b'{"prompt": "caf\xe9"}', "not UTF-8 text"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, needle):
    path = write_lines(tmp_path / "p.jsonl", '{"prompt": "ok"}', "", bad, '{"prompt": "ok"}')
    with pytest.raises(InputError) as err:
        read_prompts(path)
    assert f"{path}:3: " in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_no_prompts_is_an_error(tmp_path, content):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(path)


def test_missing_prompt_file_is_an_error(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'none.jsonl'}: cannot read the prompt file"):
        read_prompts(tmp_path / "none.jsonl")


def test_missing_tokenizer_names_the_folder(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path}: no tokenizer.json in the checkpoint folder"):
        find_tokenizer(tmp_path)


def test_missing_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)       # import tokenizers now raises ImportError
    with pytest.raises(MoeHpcError, match=r"tokenizers library: pip install 'moe_hpc\[text\]'"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_unreadable_tokenizer_names_the_file(tmp_path):
    pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is not installed (extra [text])")
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(InputError, match=f"{tmp_path / 'tokenizer.json'}: cannot read the tokenizer"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_tokenize_adds_bos_and_builds_the_input_layout(tmp_path):
    folder = build_tokenizer(tmp_path / "ckpt")
    path = write_lines(tmp_path / "p.jsonl", '{"prompt": "hello world"}', '{"prompt": "the cat sat on the mat"}',
                       '{"prompt": "café"}')
    prompts, batch, _ = read_token_prompts(path, folder, vocab_size=len(WORDS))
    assert [p.line for p in prompts] == [1, 2, 3]
    assert batch.lengths.tolist() == [3, 7, 2]
    assert batch.tokens.dtype == np.int64 and batch.tokens.tolist() == [
        [BOS, 3, 4, 0, 0, 0, 0], [BOS, 5, 6, 7, 8, 5, 9], [BOS, 10, 0, 0, 0, 0, 0]]


def test_no_bos_when_the_tokenizer_adds_none(tmp_path):
    tok = load_tokenizer(find_tokenizer(build_tokenizer(tmp_path / "ckpt", bos=False)))
    ids = tokenize(tok, [Prompt("hello world", 1)], "p.jsonl")
    assert [i.tolist() for i in ids] == [[3, 4]]


def test_prompt_without_tokens_names_the_line(tmp_path):
    tok = load_tokenizer(find_tokenizer(build_tokenizer(tmp_path / "ckpt", bos=False)))
    with pytest.raises(InputError, match="p.jsonl:4: the prompt gives no tokens"):
        tokenize(tok, [Prompt("hello", 1), Prompt("   ", 4)], "p.jsonl")


def test_token_outside_the_vocabulary_names_the_line(tmp_path):
    tok = load_tokenizer(find_tokenizer(build_tokenizer(tmp_path / "ckpt")))
    with pytest.raises(InputError, match=r"p.jsonl:2: token id 10 is outside the model's vocabulary \[0, 8\)"):
        tokenize(tok, [Prompt("hello", 1), Prompt("café", 2)], "p.jsonl", vocab_size=8)


def test_token_batch_file_reads_back_as_an_input(tmp_path):
    batch = token_batch([np.array([1, 5, 6]), np.array([1]), np.array([1, 3, 4, 7, 9])])
    write_token_batch(tmp_path / "in.h5", batch)
    assert not (tmp_path / "in.h5.tmp").exists()
    inp = open_input(tmp_path / "in.h5", hidden_size=4, vocab_size=len(WORDS))
    try:
        assert (inp.kind, inp.num_sequences, inp.seq_len) == ("tokens", 3, 5)
        assert inp.lengths.tolist() == [3, 1, 5]
        assert inp.read_chunk(0, 3, 4, len(WORDS)).tolist() == [[1, 5, 6, 0, 0], [1, 0, 0, 0, 0], [1, 3, 4, 7, 9]]
    finally:
        inp.close()


def test_decode_skips_special_tokens_and_padding(tmp_path):
    tok = load_tokenizer(find_tokenizer(build_tokenizer(tmp_path / "ckpt")))
    generated = np.array([[5, 6, EOS, -1], [3, 4, 10, 9], [-1, -1, -1, -1]], np.int32)
    assert decode(tok, generated, np.array([3, 4, 0])) == ["the cat", "hello world café mat", ""]


def test_completions_file_in_input_order(tmp_path):
    out = completions_path(tmp_path / "run.h5")
    assert out == tmp_path / "run.jsonl"
    prompts = [Prompt("hello", 1), Prompt("the café", 3)]
    write_completions(out, prompts, [" world", " sat ☕"], np.array([1, 0], np.uint8))
    assert not (tmp_path / "run.jsonl.tmp").exists()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(l) for l in lines] == [
        {"prompt": "hello", "completion": " world", "finish_reason": "max_new_tokens"},
        {"prompt": "the café", "completion": " sat ☕", "finish_reason": "eos"}]
    assert FINISH_REASONS[2] == "max_positions"


def test_completions_file_never_replaces_the_output(tmp_path):
    assert completions_path(tmp_path / "run.jsonl") == tmp_path / "run.jsonl.out.jsonl"
    assert completions_path(tmp_path / "run") == tmp_path / "run.jsonl"


def test_completions_count_must_match(tmp_path):
    with pytest.raises(ValueError):
        write_completions(tmp_path / "c.jsonl", [Prompt("a", 1)], ["x", "y"], np.array([0, 0]))
    assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "c.jsonl.tmp").exists()
