"""Document readers: every format, document boundaries, laziness, and clear errors naming the file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arwkv.data.sources import iter_documents, resolve_sources
from arwkv.errors import DataError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def texts(spec, **kw) -> list[str]:
    return [d.text for d in iter_documents(spec, **kw)]


def test_text_endoftext_separators(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("First story.\nStill first.<|endoftext|>Second <|endoftext|>\n<|endoftext|>\n\nThird\n")
    assert texts(f) == ["First story.\nStill first.", "Second", "Third"]
    docs = list(iter_documents(f))
    assert docs[0].origin.endswith("s.txt:1") and docs[2].messages is None


def test_text_split_modes(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("para one\nline two\n\n\npara two\n<|endoftext|>para three\n")
    assert texts(f) == ["para one\nline two\n\n\npara two", "para three"]
    assert texts(f, text_split="paragraph") == ["para one\nline two", "para two", "para three"]
    assert texts(f, text_split="line") == ["para one", "line two", "para two", "<|endoftext|>para three"]
    with pytest.raises(DataError, match="text_split"):
        texts(f, text_split="sentence")


def test_long_text_is_streamed_in_line_pieces(tmp_path):
    lines = [f"line {i} " + "x" * (1 + i % 17) for i in range(2000)]  # no edge whitespace: docs are stripped
    f = tmp_path / "big.txt"
    f.write_text("\n".join(lines) + "\n")
    pieces = texts(f, max_chars=1000)
    assert len(pieces) > 10
    assert all(len(p) < 1000 + 40 for p in pieces)  # cut at the first line end past the limit
    assert "\n".join(pieces).split("\n") == lines  # nothing lost, nothing repeated, cut only at line ends


def test_real_tinystories_sample(shared):
    f = shared / "assets/tinystories-samples/tinystories_sample.txt"
    expected = [s.strip() for s in f.read_text().split("<|endoftext|>") if s.strip()]
    assert texts(f) == expected and len(expected) >= 4


def test_jsonl_text_messages_and_sharegpt(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [
        {"text": "plain one"},
        {"messages": CHAT},
        {"text": "   "},
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
    ]
    lines = [json.dumps(r) for r in rows]
    f.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]))
    docs = list(iter_documents(f))
    assert [d.text for d in docs] == ["plain one", None, None]  # the blank text record is skipped
    assert docs[1].messages == CHAT
    assert docs[2].messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert docs[2].origin.endswith("d.jsonl:5")
    g = tmp_path / "field.jsonl"
    g.write_text(json.dumps({"body": "custom field"}) + "\n")
    assert texts(g, text_field="body") == ["custom field"]


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", r"bad.jsonl:2 is not valid JSON"),
        ('{"title": "x"}', r"bad.jsonl:2: record has neither 'text' nor 'messages'"),
        ('{"messages": [{"role": "user"}]}', r"bad.jsonl:2: 'messages' must be"),
        ('{"text": 5}', r"must be a string"),
        ("[1, 2]", r"expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    docs = iter_documents(f)
    assert next(docs).text == "ok"  # lazy: the bad line is only met when reading reaches it
    with pytest.raises(DataError, match=match):
        list(docs)


def test_parquet_text_and_messages(tmp_path):
    pq.write_table(pa.table({"text": ["a b c", "d e", ""], "id": [1, 2, 3]}), tmp_path / "t.parquet")
    pq.write_table(pa.table({"messages": [CHAT, CHAT[:1]]}), tmp_path / "m.parquet")
    assert texts(tmp_path / "t.parquet") == ["a b c", "d e"]
    docs = list(iter_documents(tmp_path / "m.parquet"))
    assert docs[0].messages == CHAT and docs[1].messages == CHAT[:1]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "o.parquet")
    with pytest.raises(DataError, match=r"o.parquet has no 'messages' or 'text' column \(columns: \['body'"):
        list(iter_documents(tmp_path / "o.parquet"))


def test_hf_dataset_on_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(str(tmp_path / "ds"))
    assert texts(tmp_path / "ds") == ["one", "two", "three"]
    dd = DatasetDict(
        {
            "train": Dataset.from_dict({"messages": [CHAT]}),
            "test": Dataset.from_dict({"messages": [CHAT[:1]]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [d.messages for d in iter_documents(tmp_path / "dd")] == [CHAT]
    assert [d.messages for d in iter_documents(tmp_path / "dd", split="test")] == [CHAT[:1]]
    with pytest.raises(DataError, match=r"has splits \['train', 'test'\], not 'valid'"):
        list(iter_documents(tmp_path / "dd", split="valid"))


def test_folders_globs_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "three"}) + "\n")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "notes.csv").write_text("x,y")
    assert texts(tmp_path) == ["one", "two", "three"]
    assert texts(str(tmp_path / "**" / "*.txt")) == ["one", "two"]
    assert texts([tmp_path / "c.jsonl", tmp_path / "a.txt", tmp_path / "a.txt"]) == ["three", "one"]
    assert texts(tmp_path / "README.md") == ["not data"]  # named explicitly, a .md file is read
    assert resolve_sources(tmp_path) == resolve_sources(tmp_path)


def test_missing_empty_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt does not exist"):
        list(iter_documents(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty.txt is empty"):
        list(iter_documents(tmp_path / "empty.txt"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank.jsonl is empty"):
        list(iter_documents(tmp_path / "blank.jsonl"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not valid UTF-8"):
        list(iter_documents(tmp_path / "latin1.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"cannot read .*broken.parquet as parquet"):
        list(iter_documents(tmp_path / "broken.parquet"))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'"):
        list(iter_documents(tmp_path / "data.csv"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=r"holds no data files"):
        list(iter_documents(tmp_path / "sub"))
    with pytest.raises(DataError, match=r"no data files match"):
        list(iter_documents(str(tmp_path / "*.parquet.gz")))
