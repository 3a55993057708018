"""Readers: every file type gives the same examples; bad rows are named by file and real line."""

from __future__ import annotations

import csv
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from peftkit.data import DataConfig, build_datasets, read_file
from peftkit.errors import DataError

ROWS = [
    {"prompt": "2+2=", "completion": "4"},
    {"prompt": "Say hello", "completion": "hello world"},
    {"prompt": "Colour of the sky?", "completion": "blue"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, fields=None):
    fields = fields or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_all_formats(tmp_path, rows):
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "json": tmp_path / "d.json",
        "json_data": tmp_path / "d_data.json",
        "csv": write_csv(tmp_path / "d.csv", rows),
        "parquet": tmp_path / "d.parquet",
    }
    paths["json"].write_text(json.dumps(rows))
    paths["json_data"].write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    return paths


def encode(source, tokenizer, **options):
    return build_datasets(DataConfig(train=source, **options), tokenizer, seed=0).train


def by_origin_order(examples):
    return sorted(examples, key=lambda e: e.answer)


def test_every_reader_gives_the_same_examples(tmp_path, tiny_tokenizer):
    paths = write_all_formats(tmp_path, ROWS)
    reference = by_origin_order(encode(ROWS, tiny_tokenizer))
    assert [e.answer for e in reference] == ["4", "blue", "hello world"]
    for kind, path in paths.items():
        examples = by_origin_order(encode(str(path), tiny_tokenizer))
        assert [e.input_ids for e in examples] == [e.input_ids for e in reference], kind
        assert [e.labels for e in examples] == [e.labels for e in reference], kind
        assert [e.prompt_ids for e in examples] == [e.prompt_ids for e in reference], kind


def test_origins_name_real_lines_and_indices(tmp_path):
    paths = write_all_formats(tmp_path, ROWS)
    assert [r.origin for r in read_file(paths["jsonl"])] == [f"{paths['jsonl']}:{i}" for i in (1, 2, 3)]
    assert [r.origin for r in read_file(paths["csv"])] == [f"{paths['csv']}:{i}" for i in (2, 3, 4)]
    assert [r.origin for r in read_file(paths["json"])] == [f"{paths['json']}[{i}]" for i in (0, 1, 2)]
    assert [r.origin for r in read_file(paths["parquet"])][2] == f"{paths['parquet']}[2]"
    assert all(r.problem is None for r in read_file(paths["json_data"]))


def test_csv_multiline_field_keeps_line_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('prompt,completion\n"two\nlines",a\nnext,b\n\nlast,c\n', encoding="utf-8")
    records = list(read_file(path))
    assert [r.data for r in records] == [
        {"prompt": "two\nlines", "completion": "a"},
        {"prompt": "next", "completion": "b"},
        {"prompt": "last", "completion": "c"},
    ]
    assert [r.origin.rsplit(":", 1)[1] for r in records] == ["2", "4", "6"]


def test_jsonl_skips_blank_lines_but_counts_them(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n{"prompt": "e", oops}\n'
    )
    with pytest.raises(DataError) as err:
        encode(str(path), tiny_tokenizer)
    message = str(err.value)
    assert f"{path}:4:" in message and "invalid JSON" in message and "skip_bad_rows" in message


def test_missing_field_names_field_and_line(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [ROWS[0], {"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: missing field 'completion'; the row has: prompt"):
        encode(str(path), tiny_tokenizer, format="prompt_completion")


def test_wrong_types_are_row_errors(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: expected a JSON object of fields, got list"):
        encode(str(path), tiny_tokenizer)
    write_jsonl(path, [ROWS[0], {"prompt": ["x"], "completion": "b"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'prompt' must be a string, got list"):
        encode(str(path), tiny_tokenizer)
    # Numbers are fine: they are printed.
    write_jsonl(path, [{"prompt": "2+2=", "completion": 4}])
    assert encode(str(path), tiny_tokenizer)[0].answer == "4"


def test_null_field_is_named_as_null(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [ROWS[0], {"prompt": "2+2=", "completion": None}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'completion' is null; give it a value"):
        encode(str(path), tiny_tokenizer)
    write_jsonl(path, [{"q": "2+2=", "a": None}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'completion' \(column 'a'\) is null"):
        encode(str(path), tiny_tokenizer, columns={"prompt": "q", "completion": "a"})


def test_classification_labels_may_be_integers_but_not_null(tmp_path):
    from peftkit.data.formats import RowError
    from peftkit.data.task_formats import text_label

    cfg = DataConfig(train=[])
    assert text_label({"text": "good", "label": 1}, cfg)["label"] == "1"
    with pytest.raises(RowError, match=r"^field 'label' is null"):
        text_label({"text": "good", "label": None}, cfg)
    with pytest.raises(RowError, match=r"^field 'text' must be a string, got list"):
        text_label({"text": [5], "label": 1}, cfg)


def test_skip_bad_rows_counts_and_reports(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.jsonl"
    lines = [
        json.dumps(ROWS[0]),
        "{not json",
        json.dumps(ROWS[1]),
        json.dumps({"prompt": "x"}),
        json.dumps(ROWS[2]),
    ]
    path.write_text("\n".join(lines) + "\n")
    data = build_datasets(
        DataConfig(train=str(path), skip_bad_rows=True, format="prompt_completion"), tiny_tokenizer
    )
    assert sorted(e.answer for e in data.train) == ["4", "blue", "hello world"]
    assert data.report.rows_read == 5 and data.report.skipped == 2
    assert data.report.skip_reasons[0].startswith(f"{path}:2: invalid JSON")
    assert data.report.skip_reasons[1].startswith(f"{path}:4: missing field 'completion'")
    assert "skipped malformed rows: 2" in data.summary()


def test_undecodable_bytes(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.csv"
    path.write_bytes(b"prompt,completion\nfine,a\ncaf\xe9 bad,b\nok,c\n")
    with pytest.raises(DataError) as err:
        encode(str(path), tiny_tokenizer)
    assert f"{path}:3: bytes are not valid utf-8 (byte 0xe9" in str(err.value)
    assert "encoding_errors: replace" in str(err.value)
    replaced = read_file(path, errors="replace")
    assert [r.data["prompt"] for r in replaced] == ["fine", "caf\ufffd bad", "ok"]
    assert [r.data["prompt"] for r in read_file(path, encoding="latin-1")][1] == "caf\xe9 bad"
    skipped = build_datasets(DataConfig(train=str(path), skip_bad_rows=True), tiny_tokenizer)
    assert sorted(e.answer for e in skipped.train) == ["a", "c"] and skipped.report.skipped == 1


def test_csv_row_with_wrong_field_count(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"t\.csv:3: row has 3 fields but the header has 2"):
        encode(str(path), tiny_tokenizer)


@pytest.mark.parametrize("content", ["", "\n\n", "prompt,completion\n"])
def test_empty_files_are_errors(tmp_path, tiny_tokenizer, content):
    path = tmp_path / ("t.csv" if content.startswith("prompt") else "t.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=r"no train data in .*: it has no rows"):
        encode(str(path), tiny_tokenizer)


def test_all_rows_skipped_is_an_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text("{bad\n{worse\n")
    with pytest.raises(DataError, match="all 2 rows were malformed and skipped"):
        encode(str(path), tiny_tokenizer, skip_bad_rows=True)


def test_missing_file_and_unknown_extension(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist"):
        encode(str(tmp_path / "nope.jsonl"), tiny_tokenizer)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'; supported: \.csv, \.json, \.jsonl"):
        encode(str(tmp_path / "notes.txt"), tiny_tokenizer)


def test_json_document_errors(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": }\n]')
    with pytest.raises(DataError, match=r"t\.json:3: invalid JSON"):
        encode(str(path), tiny_tokenizer)
    path.write_text('{"rows": []}')
    with pytest.raises(
        DataError, match=r"expected a JSON list of objects or \{\"data\": \[\.\.\.\]\}, got dict"
    ):
        encode(str(path), tiny_tokenizer)


def test_in_memory_rows_name_their_index(tiny_tokenizer):
    with pytest.raises(DataError, match=r"data\.train\[1\]: expected a dict of fields, got str"):
        encode([ROWS[0], "oops"], tiny_tokenizer)


def test_columns_the_format_does_not_read_warn_once_per_file(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "labelled.jsonl", [{"text": f"tweet {i}", "label": "pos"} for i in range(3)]
    )
    with pytest.warns(UserWarning) as record:
        encode(str(path), tiny_tokenizer)
    (warning,) = [w for w in record if "not read" in str(w.message)]
    assert f"{path}: column 'label' is not read by format text, so ignored" in str(warning.message)
    assert "set task: SEQ_CLS" in str(warning.message)
    # A column of a later row only is named too; one warning names them all.
    rows = [*ROWS, {"prompt": "p", "completion": "c", "source": "web", "id": 7}]
    with pytest.warns(
        UserWarning, match=r"data\.train .*columns 'id', 'source' are not read by format prompt_completion"
    ):
        encode(rows, tiny_tokenizer)


def test_columns_read_through_mappings_and_templates_do_not_warn(tiny_tokenizer):
    from peftkit.data import read_train_samples
    from peftkit.methods.base import TaskType
    from peftkit.tasks import get_task

    rows = [{"q": "2+2=", "a": "4", "topic": "maths"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode(ROWS, tiny_tokenizer)
        encode(rows, tiny_tokenizer, prompt_template="{topic}: {q}", columns={"completion": "a"})
        read_train_samples(DataConfig(train=[{"text": "t", "label": "pos"}]), get_task(TaskType.SEQ_CLS))
