"""Readers: every file type, every record keeps file and line, encodings decided per file."""

import json

import pytest

from qflash.data.readers import decode_bytes, read_file, read_one, read_path
from qflash.errors import DataError

MEDICAL_ROWS = [
    ("department", "title", "ask", "answer"),
    ("内科", "头痛怎么办", "最近总是头痛，晚上睡不好。", "建议规律作息，必要时就医检查。"),
    ("儿科", "孩子发烧", "孩子发烧三十八度五，要不要吃药？", "可以物理降温，超过三十八度五可服退烧药。"),
]


def write_csv(path, rows, encoding="utf-8", delimiter=","):
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\n").writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def test_json_object_forms(tmp_path):
    one = tmp_path / "one.json"
    one.write_text('\n\n{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    assert [(r.data["output"], r.line) for r in read_file(one)] == [("a", 3)]
    keyed = tmp_path / "keyed.json"
    keyed.write_text('{\n "a": {"text": "x"},\n "b": {"text": "y"}\n}\n', encoding="utf-8")
    assert [(r.data["text"], r.line) for r in read_file(keyed)] == [("x", 2), ("y", 3)]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"version": 2, "data": [\n {"text": "x"},\n {"text": "y"}\n]}\n', encoding="utf-8")
    assert [(r.data["text"], r.line) for r in read_file(wrapped)] == [("x", 2), ("y", 3)]


def test_json_lines_in_a_json_file_are_read_as_jsonl(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [(r.data["text"], r.line) for r in read_file(p)] == [("a", 1), ("b", 2)]


def test_malformed_json_array_resumes_at_the_next_record(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": oops},\n  {"text": "c"}\n]\n', encoding="utf-8")
    fr = read_one(p)
    assert [(r.data["text"], r.line) for r in fr.records] == [("a", 2), ("c", 4)]
    assert [(pr.line, pr.kind) for pr in fr.problems] == [(3, "malformed JSON")]


def test_jsonl_keeps_going_after_a_bad_line_and_u2028_is_not_a_line_break(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a\u2028b"}\n{"text": \n\n{"text": "c"}\n', encoding="utf-8")
    fr = read_one(p)
    assert [(r.data["text"], r.line) for r in fr.records] == [("a\u2028b", 1), ("c", 4)]
    assert fr.problems[0].message.startswith(f"{p}:2: malformed JSON")


def test_csv_rows_keep_the_physical_line_they_start_on(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('ask,answer\n"two\nlines",a\n\nq3,"multi\nline\nanswer"\nq4,a4\n', encoding="utf-8")
    recs = list(read_file(p))
    assert [(r.data["ask"], r.line) for r in recs] == [("two\nlines", 2), ("q3", 5), ("q4", 8)]


def test_csv_row_with_wrong_field_count_is_a_problem(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("ask,answer\nq1,a1\nq2,a2,extra\n", encoding="utf-8")
    fr = read_one(p)
    assert len(fr.records) == 1 and fr.problems[0].line == 3
    assert "the row has 3 fields, the header 2" in fr.problems[0].reason


def test_tsv_and_parquet(tmp_path):
    t = write_csv(tmp_path / "x.tsv", [("ask", "answer"), ("q, with comma", "a")], delimiter="\t")
    assert [r.data for r in read_file(t)] == [{"ask": "q, with comma", "answer": "a"}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"ask": ["q1", "q2", "q3"], "answer": ["a1", "a2", "a3"]}), p, row_group_size=2)
    fr = read_one(p)
    assert [(r.data["ask"], r.line) for r in fr.records] == [("q1", 1), ("q2", 2), ("q3", 3)]
    assert fr.columns == ["ask", "answer"] and fr.encoding == "parquet"


def test_gb18030_csv_is_detected(tmp_path):
    p = write_csv(tmp_path / "medical.csv", MEDICAL_ROWS, encoding="gb18030")
    fr = read_one(p)
    assert fr.encoding == "gb18030" and not fr.problems
    assert fr.records[1].data["ask"] == "孩子发烧三十八度五，要不要吃药？" and fr.records[1].line == 3


def test_utf8_bom_and_utf16(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffask,answer\n问,答\n".encode("utf-8"))
    fr = read_one(p)
    assert fr.encoding == "utf-8 (BOM)" and fr.records[0].data == {"ask": "问", "answer": "答"}
    q = tmp_path / "u16.jsonl"
    q.write_bytes('{"text": "héllo"}\n'.encode("utf-16"))
    assert read_one(q).records[0].data == {"text": "héllo"}


def test_latin1_byte_in_utf8_file_is_a_problem_of_that_line_only(tmp_path):
    q = tmp_path / "latin1.jsonl"
    q.write_bytes('{"text": "naïve ok"}\n'.encode() + b'{"text": "caf\xe9t\xe9"}\n' + '{"text": "中文 fine"}\n'.encode())
    fr = read_one(q)
    assert fr.encoding == "utf-8"
    assert [r.data["text"] for r in fr.records] == ["naïve ok", "中文 fine"]
    (problem,) = fr.problems
    assert problem.kind == "invalid encoding" and problem.message.startswith(f"{q}:2: byte 0xe9 is not valid UTF-8")
    # The same in a pretty-printed JSON array and in a CSV: only the record holding the byte is lost.
    a = tmp_path / "latin1.json"
    a.write_bytes(b'[\n {"text": "ok"},\n {"text":\n  "caf\xe9"},\n {"text": "fine"}\n]\n')
    fr = read_one(a)
    assert [r.data["text"] for r in fr.records] == ["ok", "fine"] and fr.problems[0].line == 4
    c = tmp_path / "latin1.csv"
    c.write_bytes(b"ask,answer\nq1,a1\nq2,caf\xe9\n")
    fr = read_one(c)
    assert [r.line for r in fr.records] == [2] and fr.problems[0].line == 3


def test_an_ascii_file_with_one_latin1_byte_that_gb18030_would_accept_stays_utf8():
    # b"\xe9t" is a valid GB18030 pair; a lone accent between ASCII letters is not Chinese text.
    dec = decode_bytes(b'{"text": "\xe9t\xe9 au caf\xe9 d\xe9j\xe0"}\n')
    assert dec.encoding == "utf-8" and list(dec.bad_lines) == [1]


def test_directory_reads_every_data_file_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.jsonl").write_text('{"text": "two"}\n', encoding="utf-8")
    (tmp_path / "1.json").write_text('[{"text": "one"}]', encoding="utf-8")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "no"}\n', encoding="utf-8")
    (tmp_path / "README.md").write_text("notes", encoding="utf-8")
    assert [r.data["text"] for fr in read_path(tmp_path) for r in fr.records] == ["one", "two"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no data files"):
        read_path(empty)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_path(tmp_path / "nope.jsonl")
    p = tmp_path / "x.txt"
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported data file type '\.txt'"):
        read_path(p)


def test_read_file_raises_every_problem_at_once(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(["{bad"] * 25 + [json.dumps({"text": "ok"})]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(read_file(p))
    msg = str(e.value)
    assert "25 data problem(s) in 25 record(s) (malformed JSON: 25)" in msg
    assert f"{p}:20: malformed JSON" in msg and f"{p}:21:" not in msg and "... and 5 more" in msg


def test_keyed_json_with_an_id_given_twice_keeps_both_apart(tmp_path):
    # json.loads keeps the last of two equal keys: the first record used to vanish without a word.
    p = tmp_path / "keyed.json"
    p.write_text('{\n "a": {"text": "first"},\n "b": {"text": "bee"},\n "a": {"text": "second"}\n}\n', encoding="utf-8")
    fr = read_one(p)
    assert [(r.data["text"], r.line) for r in fr.records] == [("first", 2), ("bee", 3)]
    (problem,) = fr.problems
    assert problem.kind == "duplicate id" and problem.raw == '{"text": "second"}'
    assert problem.message == (f"{p}:4: duplicate id 'a': the record at line 2 has the same id; "
                               "give every record its own id")
    with pytest.raises(DataError, match="1 data problem.*duplicate id: 1"):
        list(read_file(p))
    # The list of a {"data": [...]} file given twice: the file is refused, not half read.
    w = tmp_path / "wrapped.json"
    w.write_text('{"data": [{"text": "x"}],\n "data": [{"text": "y"}]}\n', encoding="utf-8")
    fr = read_one(w)
    assert fr.records == [] and fr.problems[0].message.startswith(
        f"{w}:2: the key 'data' holding the records is given 2 times (lines 1 and 2)")
