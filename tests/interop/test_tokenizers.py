"""Part c (tokenizers): Hugging Face's `tokenizers` library and `qlora tokenize` give the same ids
on the fixture datasets, for every fixture tokenizer.json; llama.cpp and `qlora tokenize` give the
same ids for the vocab-only GGUF of Qwen2's tokenizer (Qwen2, Qwen2.5 and Qwen3 share it; unpacked
from the pinned llama-cpp-python sdist by scripts/peer-fixtures.sh), read from the GGUF's metadata.

The documents (at least 2,000 per tokenizer: English instructions and answers, medical dialogues and
abstracts, Chinese legal questions, LegalBench clauses) are joined into one file with the
tokenizer's EOS token between them, so one qlora process encodes them all (`qlora tokenize --file
--ids-only --no-special`); HF encodes the same text. Both split out the EOS as a special token, so
the ids are cut at it again to count agreement document by document."""
import csv
import json
from pathlib import Path

import pytest

from conftest import CACHE, fixtures_dir, lib, need_fixture, report, run_qlora, version

TOKENIZERS = ["tokenizers/llama3/assembled_hf", "tokenizers/llama2-hf", "tokenizers/smollm-135m-instruct",
              "models/stories260K/hf"]


def documents() -> list[str]:
    """The test documents, in a fixed order, from the fixture datasets."""
    base = fixtures_dir()
    if base is None:
        pytest.skip("fixtures absent (../shared/fixtures or $QLORA_FIXTURES)")
    d = base / "datasets"
    docs: list[str] = []

    def add(s):
        if isinstance(s, str) and s.strip():
            docs.append(s)

    try:
        for r in json.loads((d / "alpaca/llamafactory_alpaca_en_demo.json").read_text())[:500]:
            add(r.get("instruction"))
            add(r.get("output"))
        for r in json.loads((d / "medical/chatdoctor_genmedgpt5k.json").read_text())[:400]:
            add(r.get("input"))
            add(r.get("output"))
        pub = json.loads((d / "medical/pubmedqa_ori_pqal.json").read_text())
        for k in list(pub)[:150]:
            add(pub[k]["QUESTION"])
            add(" ".join(pub[k]["CONTEXTS"]))
            add(pub[k].get("LONG_ANSWER"))
        for r in json.loads((d / "legal/lawyer-llama/legal_advice.json").read_text())[:300]:
            for turn in (r if isinstance(r, list) else [r]):
                add(turn.get("instruction"))
                add(turn.get("output"))
        for task in sorted((d / "legal/legalbench").iterdir()):
            with open(task / "train.tsv", newline="") as f:
                for row in list(csv.reader(f, delimiter="\t"))[1:40]:
                    add(max(row, key=len))
        for line in (d / "chat/llamafactory_v1_sft_demo.jsonl").read_text().splitlines()[:60]:
            for m in json.loads(line).get("messages", []):
                for part in m.get("content") or []:
                    add(part.get("value") if isinstance(part, dict) else None)
    except FileNotFoundError as e:
        pytest.skip(f"fixture dataset absent: {e.filename}")
    return docs


def eos_text(tok_dir: Path) -> str:
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    e = cfg.get("eos_token")
    return e["content"] if isinstance(e, dict) else e


def load_hf(tokenizers, path: Path):
    """tokenizers.Tokenizer of a tokenizer.json. Older files (the Llama-2 one) hold merges whose tokens
    contain spaces written as "a b" strings, which tokenizers 0.20+ refuses ("Merges text file
    invalid"); those are rewritten as [a, b] pairs, split where both halves and their concatenation are
    vocabulary entries. Returns (tokenizer, number of merges rewritten)."""
    try:
        return tokenizers.Tokenizer.from_file(str(path)), 0
    except Exception:
        d = json.loads(path.read_text())
        vocab = d["model"]["vocab"]
        merges, fixed = [], 0
        for m in d["model"]["merges"]:
            if isinstance(m, str):
                cuts = [i for i, c in enumerate(m) if c == " "]
                ok = [(m[:i], m[i + 1:]) for i in cuts if m[:i] in vocab and m[i + 1:] in vocab and m[:i] + m[i + 1:] in vocab]
                assert len(ok) == 1, f"merge {m!r} of {path} splits in {len(ok)} ways"
                fixed += len(cuts) != 1
                m = list(ok[0])
            merges.append(m)
        d["model"]["merges"] = merges
        return tokenizers.Tokenizer.from_str(json.dumps(d)), fixed


def split_at(ids, sep):
    out, cur = [], []
    for i in ids:
        if i == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(i)
    out.append(cur)
    return out


@pytest.mark.parametrize("rel", TOKENIZERS)
def test_tokenizer_ids(rel, tmp_path):
    tokenizers = lib("tokenizers")
    tok_dir = need_fixture(rel)
    docs = documents()
    eos = eos_text(tok_dir)
    hf, fixed = load_hf(tokenizers, tok_dir / "tokenizer.json")
    sep = hf.token_to_id(eos)
    assert sep is not None, f"{eos} is not a token of {rel}"
    docs = [x for x in docs if eos not in x]
    text = eos.join(docs)
    f = tmp_path / "docs.txt"
    f.write_bytes(text.encode("utf-8"))
    r = run_qlora("tokenize", "--tokenizer", tok_dir, "--file", f, "--ids-only", "--no-special")
    ours = [int(x) for x in r.stdout.split()]
    ref = hf.encode(text, add_special_tokens=False).ids
    a, b = split_at(ours, sep), split_at(ref, sep)
    per_doc = len(b) == len(docs)  # the EOS was split out as a special token between every two documents
    same_docs = sum(1 for x, y in zip(a, b) if x == y) if per_doc and len(a) == len(b) else None
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if x != y][:3] if per_doc and len(a) == len(b) else []
    examples = "; ".join(f"doc {i} {docs[i][:60]!r}" for i in bad)
    # Llama 2's tokenizer.json marks </s> "normalized": HF does not split it out of running text (nor
    # does qlora), so there the documents are compared as one stream only
    docs_line = (f"{same_docs:,}/{len(docs):,} documents identical" if same_docs is not None else
                 f"{len(docs):,} documents compared as one stream ({eos} not split out by this tokenizer)")
    report("tokenizers.ids", f"{rel}: {len(docs):,} documents ({len(text.encode()) / 1e6:.2f} MB), "
           f"tokenizers.Tokenizer.encode vs qlora tokenize --file", version("tokenizers"),
           f"{docs_line}, {len(ref):,} ids; whole stream equal: {ours == ref}"
           + (f" ({fixed} merges of spaces rewritten as pairs for tokenizers to load the file)" if fixed else "")
           + (f"; first differing: {examples}" if examples else ""),
           tokenizer=rel, docs=len(docs), same_docs=same_docs, ids=len(ref))
    assert len(docs) >= 2000
    assert ours == ref, f"ids differ ({docs_line}): {examples}"


def test_qwen2_gguf_vocab_against_llamacpp(tmp_path):
    """The same documents through llama.cpp's tokenizer (llama_cpp.Llama, vocab_only) and through
    qlora's reading of the same GGUF's tokenizer.ggml.* metadata (tokenizer/gguf_vocab, pre "qwen2")."""
    llama_cpp = lib("llama_cpp", "llama-cpp-python")
    gguf = need_fixture("tokenizer_tests/llamacpp/ggml-vocab-qwen2.gguf")
    docs = documents()
    eos = "<|endoftext|>"
    docs = [x for x in docs if eos not in x]
    text = eos.join(docs)
    f = tmp_path / "docs.txt"
    f.write_bytes(text.encode("utf-8"))
    r = run_qlora("tokenize", "--tokenizer", gguf, "--file", f, "--ids-only", "--no-special")
    ours = [int(x) for x in r.stdout.split()]
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    ref = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    sep = llm.tokenize(eos.encode("utf-8"), add_bos=False, special=True)
    assert len(sep) == 1, f"{eos} is not one special token of the Qwen2 vocabulary: {sep}"
    a, b = split_at(ours, sep[0]), split_at(ref, sep[0])
    same_docs = sum(1 for x, y in zip(a, b) if x == y) if len(a) == len(b) == len(docs) else None
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if x != y][:3] if same_docs is not None else []
    examples = "; ".join(f"doc {i} {docs[i][:60]!r}" for i in bad)
    report("tokenizers.ids", f"ggml-vocab-qwen2.gguf (Qwen2/2.5/3 vocabulary): {len(docs):,} documents "
           f"({len(text.encode()) / 1e6:.2f} MB), llama_cpp.Llama.tokenize vs qlora tokenize --file",
           version("llama-cpp-python"),
           f"{same_docs if same_docs is not None else '?'}/{len(docs):,} documents identical, {len(ref):,} ids; "
           f"whole stream equal: {ours == ref}" + (f"; first differing: {examples}" if examples else ""),
           tokenizer="ggml-vocab-qwen2.gguf", docs=len(docs), same_docs=same_docs, ids=len(ref))
    assert len(docs) >= 2000
    assert ours == ref, f"ids differ: {examples}"
