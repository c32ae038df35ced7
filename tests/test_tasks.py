"""Task loading: every built-in loader on real files, bad rows, generic specs.

The format checks read the real slices shipped in tests/fixtures/data (no ../shared needed); the
official sizes and label balances of the full files, and the fixtures' provenance, are `realdata` tests.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA

from trainer.config import from_dict
from trainer.data.tasks import (
    BUILTIN_TASKS,
    Example,
    LoadedSplit,
    TaskSpec,
    builtin_task,
    default_data_root,
    load_split,
    resolve_task,
)
from trainer.errors import UserError

# (task, split) -> official row count and label distribution by label *string* (from shared/data/README.md).
OFFICIAL = {
    ("sst2", "train"): (67_349, {"0": 29_780, "1": 37_569}),
    ("sst2", "dev"): (872, {"0": 428, "1": 444}),
    ("rte", "train"): (2_490, {"entailment": 1_249, "not_entailment": 1_241}),
    ("rte", "dev"): (277, {"entailment": 146, "not_entailment": 131}),
    ("mrpc", "train"): (3_668, {"1": 2_474, "0": 1_194}),
    ("mrpc", "dev"): (408, {"1": 279, "0": 129}),
    ("cola", "train"): (8_551, {"1": 6_023, "0": 2_528}),
    ("cola", "dev"): (1_043, {"1": 721, "0": 322}),
    ("imdb", "train"): (25_000, {"1": 12_500, "0": 12_500}),
    ("imdb", "dev"): (25_000, {"1": 12_500, "0": 12_500}),
    ("amazon_books", "train"): (1_700, {"0": 850, "1": 850}),
    ("amazon_books", "dev"): (300, {"0": 150, "1": 150}),
}
# The shipped slices (tests/fixtures/README.md): (task, split) -> rows and label distribution.
FIXTURES = {
    ("sst2", "train"): (2_400, {"0": 1_095, "1": 1_305}),
    ("sst2", "dev"): (301, {"0": 145, "1": 156}),
    ("rte", "train"): (100, {"entailment": 51, "not_entailment": 49}),
    ("rte", "dev"): (50, {"entailment": 25, "not_entailment": 25}),
    ("mrpc", "train"): (100, {"1": 64, "0": 36}),
    ("mrpc", "dev"): (50, {"1": 30, "0": 20}),
    ("cola", "train"): (200, {"1": 132, "0": 68}),
    ("cola", "dev"): (100, {"1": 76, "0": 24}),
    ("imdb", "train"): (40, {"1": 20, "0": 20}),
    ("imdb", "dev"): (40, {"1": 20, "0": 20}),
    ("amazon_books", "train"): (30, {"0": 30}),
    ("amazon_books", "dev"): (20, {"0": 20}),
}
_cache: dict[tuple[Path, str, str], LoadedSplit] = {}


def load(root: Path, task: str, split: str) -> LoadedSplit:
    """Each split is read once per session (the full SST-2 and IMDb are the slow ones)."""
    if (root, task, split) not in _cache:
        _cache[root, task, split] = load_split(builtin_task(task), split, root)
    return _cache[root, task, split]


def line_of(ex: Example) -> int:
    return int(ex.source.rsplit(":", 1)[1])


def check_split(root: Path, task: str, split: str, n: int, dist: dict[str, int]) -> None:
    loaded = load(root, task, split)
    assert len(loaded.examples) == n
    assert loaded.skipped == 0 and loaded.skipped_reasons == {}
    names = builtin_task(task).labels
    assert names is not None
    assert Counter(names[e.label] for e in loaded.examples) == dist
    assert all(isinstance(e.label, int) for e in loaded.examples)
    assert all(e.text_a.strip() for e in loaded.examples)
    assert loaded.path.is_file() and loaded.path.is_relative_to(root)
    # sources are unique, increasing physical lines of that file
    lines = [line_of(e) for e in loaded.examples]
    assert lines == sorted(set(lines))
    assert all(e.source.startswith(f"{loaded.path}:") for e in loaded.examples[:3])


@pytest.mark.realdata
@pytest.mark.parametrize(("task", "split"), list(OFFICIAL))
def test_real_split_has_official_size_and_labels(real_data, task, split):
    check_split(real_data, task, split, *OFFICIAL[task, split])


@pytest.mark.parametrize(("task", "split"), list(FIXTURES))
def test_fixture_split_loads_every_row(task, split):
    check_split(FIXTURE_DATA, task, split, *FIXTURES[task, split])


@pytest.mark.realdata
def test_fixtures_are_exact_slices_of_the_real_files(real_data):
    sys.path.insert(0, str(FIXTURE_DATA.parent))
    from make_fixtures import SLICES, cut_slices, read

    assert sorted(str(p.relative_to(FIXTURE_DATA)) for p in FIXTURE_DATA.rglob("*") if p.is_file()) == sorted(SLICES)
    for rel, expected in cut_slices(real_data).items():
        assert read(FIXTURE_DATA / rel) == expected, rel


@pytest.mark.realdata
def test_real_files_end_as_documented(real_data):
    """Last rows of the full files (the slices hold the first rows, or the last ones for CoLA dev)."""
    train = load(real_data, "sst2", "train").examples
    assert train[-1].text_a == (
        "this new jangle of noise , mayhem and stupidity must be a serious contender for the title . "
    )
    assert line_of(train[-1]) == 67_350
    last = load(real_data, "rte", "dev").examples[-1]
    assert last.text_a.startswith('Danny Kennedy, Greenpeace campaigns director, said: "The burden')
    assert last.text_a.endswith('because [it] opposes his political opinions."')
    assert last.text_b == "Greenpeace director said that peace is terrorism." and last.label == 1
    assert line_of(last) == 278
    dev_path = real_data / "glue/CoLA/dev.tsv"
    assert load(real_data, "cola", "dev").examples[-1] == Example(
        "John talked to Bill about himself.", None, 1, f"{dev_path}:1043"
    )
    books = load(real_data, "amazon_books", "train").examples
    last = books[-1]
    assert last.text_a.startswith("We Love This Book!\n\tPretty much all of the Todd Parr books") and last.label == 1
    physical = gzip.open(real_data / "amazon-books-blitzer/autoprompt_split/train.tsv.gz").read().split(b"\n")
    assert physical[line_of(last) - 1].startswith(b'"We Love This Book!')  # records end in CRLF, inner lines LF


def test_sst2_rows_keep_trailing_space_and_label():
    train = load(FIXTURE_DATA, "sst2", "train").examples
    assert train[0] == Example(
        "hide new secretions from the parental units ", None, 0, f"{FIXTURE_DATA / 'glue/SST-2/train.tsv.gz'}:2"
    )
    assert all(e.text_a.endswith(" ") for e in train)  # train sentences end in a space before the tab
    assert line_of(train[-1]) == 2_401
    dev = load(FIXTURE_DATA, "sst2", "dev").examples
    assert dev[0].text_a == "it 's a charming and often affecting journey . " and dev[0].label == 1


def test_rte_quotes_survive_and_string_labels_map_by_position():
    train = load(FIXTURE_DATA, "rte", "train").examples
    assert train[0].text_a == "No Weapons of Mass Destruction Found in Iraq Yet."
    assert train[0].text_b == "Weapons of Mass Destruction Found in Iraq."
    assert train[0].label == 1  # not_entailment is labels[1]
    quoted = next(e for e in train if line_of(e) == 52)  # the field *starts* with '"': QUOTE_MINIMAL would eat it
    assert quoted.text_a.startswith('"Instead of action on crime, we got the federal long gun registry')
    raw = (FIXTURE_DATA / "glue/RTE/train.tsv").read_text(encoding="utf-8").split("\n")[51].split("\t")
    assert (quoted.text_a, quoted.text_b) == (raw[1], raw[2])


def test_mrpc_header_bom_and_sentence_pair():
    assert (FIXTURE_DATA / "glue/MRPC/train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    first = load(FIXTURE_DATA, "mrpc", "train").examples[0]
    assert first.text_a == (
        'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .'
    )
    assert first.text_b.startswith('Referring to him as only " the witness " , Amrozi')
    assert first.label == 1
    # Without utf-8-sig the BOM glues onto the first header name and the label column is not found.
    spec = builtin_task("mrpc")
    spec.encoding = "utf-8"
    with pytest.raises(UserError, match=r"MRPC/train\.tsv:1: no column 'Quality' in header \[\ufeffQuality, "):
        load_split(spec, "train", FIXTURE_DATA)


def test_cola_has_no_header_and_dev_last_line_without_newline_is_loaded():
    dev_path = FIXTURE_DATA / "glue/CoLA/dev.tsv"
    assert not dev_path.read_bytes().endswith(b"\n")
    train = load(FIXTURE_DATA, "cola", "train").examples
    assert train[0].text_a == "Our friends won't buy this analysis, let alone the next one we propose."
    assert line_of(train[0]) == 1  # no header: line 1 is data
    dev = load(FIXTURE_DATA, "cola", "dev").examples
    assert dev[-1] == Example("John talked to Bill about himself.", None, 1, f"{dev_path}:100")


def test_imdb_jsonl_int_labels_and_order():
    train = load(FIXTURE_DATA, "imdb", "train").examples
    assert train[0].text_a.startswith("Bromwell High is a cartoon comedy.") and train[0].label == 1
    assert [e.label for e in train[:4]] == [1, 0, 1, 0]  # pos before neg for each id
    assert "<br />" in "".join(e.text_a for e in train)  # HTML tags are kept as in the source
    assert builtin_task("imdb").dev == "imdb/test.jsonl.gz"


def test_amazon_books_multiline_quoted_fields():
    train = load(FIXTURE_DATA, "amazon_books", "train").examples
    assert train[0].text_a.startswith("Horrible book, horrible.\n\tTHis book was horrible.  If it was possible")
    assert train[0].text_a.endswith("THis book wasted my life")
    assert '"shrink" bashers' in train[1].text_a  # doubled quotes are unescaped
    assert not any("\r" in e.text_a for e in train)  # CRLF record ends are not part of the text
    physical = gzip.open(FIXTURE_DATA / "amazon-books-blitzer/autoprompt_split/train.tsv.gz").read().split(b"\n")
    assert len(physical) > len(train) + 1  # records span several physical lines
    for ex in train:
        first_line = ex.text_a.split("\n")[0].replace('"', '""')
        assert physical[line_of(ex) - 1].startswith(b'"' + first_line.encode())
    # read GLUE-style (no quote processing) the same file is garbage: rows break at the embedded newlines
    spec = builtin_task("amazon_books")
    spec.quoting = "none"
    with pytest.raises(UserError, match=r"train\.tsv\.gz:2: expected 2 fields, got 1$"):
        load_split(spec, "train", FIXTURE_DATA)


# --- synthetic files ----------------------------------------------------------------------------------

RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def rte_like(tmp_path: Path, rows: list[str], name: str = "train.tsv", **kw) -> TaskSpec:
    (tmp_path / name).write_text(RTE_HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    spec = builtin_task("rte")
    spec.train = str(tmp_path / name)
    for key, value in kw.items():
        setattr(spec, key, value)
    return spec


GOOD = "0\tA man sleeps.\tSomeone sleeps.\tentailment"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1\tA man sleeps.\tSomeone sleeps.\tmaybe", "label 'maybe' not in [entailment, not_entailment]"),
        ("1\tA man sleeps.\tentailment", "expected 4 fields, got 3"),
        ("1\tA\tB\tentailment\textra", "expected 4 fields, got 5"),
        ("1\t  \tSomeone sleeps.\tentailment", "empty text in column 'sentence1'"),
        ("1\tA man sleeps.\t\tnot_entailment", "empty text in column 'sentence2'"),
    ],
)
def test_bad_row_is_a_one_line_error_with_file_and_line(tmp_path, row, message):
    spec = rte_like(tmp_path, [GOOD, GOOD, row, GOOD])
    with pytest.raises(UserError) as err:
        load_split(spec, "train")
    assert str(err.value) == f"{tmp_path / 'train.tsv'}:4: {message}"
    assert "\n" not in str(err.value)


def test_skip_bad_rows_counts_by_reason(tmp_path):
    rows = [
        GOOD,
        "1\tx\ty\tmaybe",
        "2\tx\tentailment",
        "3\t \ty\tentailment",
        "4\tx\ty\tMAYBE",
        "",
        "5\tB.\tC.\tnot_entailment",
        "6\tx\ty\tz\tentailment",
    ]
    loaded = load_split(rte_like(tmp_path, rows, skip_bad_rows=True), "train")
    assert [(e.text_a, e.label, line_of(e)) for e in loaded.examples] == [("A man sleeps.", 0, 2), ("B.", 1, 8)]
    assert loaded.skipped == 5  # the blank line is ignored, not counted
    assert loaded.skipped_reasons == {"bad label": 2, "missing column": 1, "empty text": 1, "wrong number of fields": 1}


def test_missing_file_split_and_column_are_one_line_errors(tmp_path):
    spec = rte_like(tmp_path, [GOOD])
    with pytest.raises(UserError, match=r"^task rte has no test split"):
        load_split(spec, "test")
    with pytest.raises(UserError, match=r"^unknown split 'validation'"):
        load_split(spec, "validation")
    spec.dev = "nowhere/dev.tsv"
    with pytest.raises(UserError, match="^" + re.escape(f"{tmp_path}/nowhere/dev.tsv: rte dev file not found")):
        load_split(spec, "dev", data_root=tmp_path)
    spec.text_b = "hypothesis"
    with pytest.raises(UserError, match=r"train\.tsv:1: no column 'hypothesis' in header \[index, sentence1"):
        load_split(spec, "train")  # a header problem is never skippable: it would drop every row
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(UserError, match="empty file"):
        load_split(TaskSpec(name="e", format="tsv", train=str(tmp_path / "empty.tsv")), "train")


def test_headerless_rows_and_gzip(tmp_path):
    path = tmp_path / "cola.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('src\t1\nsrc\t1\t\tGood "quoted" one.\nsrc\t0\t*\tBad one.\nsrc\t1\t\tfour\textra\nsrc\t1\tonly three')
    spec = builtin_task("cola")
    spec.train = str(path)
    with pytest.raises(UserError, match="^" + re.escape(f"{path}:1: no column 3 (row has 2 fields)") + "$"):
        load_split(spec, "train")
    spec.skip_bad_rows = True
    loaded = load_split(spec, "train")  # the first *complete* row fixes the width (4), not a broken first row
    assert [(e.text_a, e.label, line_of(e)) for e in loaded.examples] == [
        ('Good "quoted" one.', 1, 2),
        ("Bad one.", 0, 3),
    ]
    assert loaded.skipped_reasons == {"missing column": 2, "wrong number of fields": 1}


def test_generic_jsonl_spec_with_column_mapping(tmp_path):
    rows = [
        {"review": "Great.", "summary": "ok", "stars": 1},
        {"review": "Awful.", "summary": "no", "stars": "0"},
        {"review": "Meh.", "summary": "hm", "stars": 1.0},
    ]
    path = tmp_path / "reviews.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    spec = from_dict(
        TaskSpec,
        {
            "name": "reviews",
            "format": "jsonl",
            "train": "reviews.jsonl.gz",
            "text_a": "review",
            "text_b": "summary",
            "label": "stars",
        },
    )
    loaded = load_split(spec, "train", tmp_path)
    assert [(e.text_a, e.text_b, e.label, line_of(e)) for e in loaded.examples] == [
        ("Great.", "ok", 1, 1),
        ("Awful.", "no", 0, 2),
        ("Meh.", "hm", 1, 4),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"review": "x", "summary": "y", "stars": 1}\n{"review": "x", "stars": 1}\n'
        '{"review": "x", "summary": "y", "stars": 2}\n{"review": null, "summary": "y", "stars": 1}\n'
        'not json\n[1, 2]\n{"review": 5, "summary": "y", "stars": 1}\n'
    )
    spec.train = str(bad)
    with pytest.raises(UserError, match="^" + re.escape(f"{bad}:2: missing key 'summary'") + "$"):
        load_split(spec, "train")
    spec.skip_bad_rows = True
    loaded = load_split(spec, "train")
    assert len(loaded.examples) == 1
    assert loaded.skipped_reasons == {
        "missing column": 1,
        "bad label": 1,
        "empty text": 1,
        "invalid json": 2,
        "text not a string": 1,
    }


def test_generic_csv_spec_with_real_quoting(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        'id,question,answer,verdict\n1,"Is it, really?","Yes.\nReally ""yes"".",good\n2,Plain,Text,bad\n',
        encoding="utf-8",
    )
    spec = from_dict(
        TaskSpec,
        {
            "name": "pairs",
            "format": "csv",
            "dev": str(path),
            "text_a": "question",
            "text_b": "answer",
            "label": "verdict",
            "labels": ["bad", "good"],
        },
    )
    assert spec.resolved_quoting() == "csv"  # the format's natural default
    loaded = load_split(spec, "dev")
    assert loaded.examples == [
        Example("Is it, really?", 'Yes.\nReally "yes".', 1, f"{path}:2"),
        Example("Plain", "Text", 0, f"{path}:4"),
    ]


def test_generic_spec_from_yaml_file(tmp_path):
    data = tmp_path / "data"
    (data / "mine").mkdir(parents=True)
    (data / "mine" / "train.tsv").write_text("text\ttag\nfirst one\tneg\nsecond one\tpos\nthird\tneu\n")
    spec_file = tmp_path / "mytask.yaml"
    spec_file.write_text(
        "name: mine\nformat: tsv\ntrain: mine/train.tsv\ntext_a: text\nlabel: tag\nlabels: [neg, neu, pos]\n"
    )
    spec = resolve_task(str(spec_file))
    assert spec.num_labels == 3 and not spec.is_regression
    loaded = load_split(spec, "train", data)
    assert [(e.text_a, e.label) for e in loaded.examples] == [("first one", 0), ("second one", 2), ("third", 1)]
    spec_file.write_text("name: mine\nformat: tsv\ntrain: a.tsv\ntext: t\n")
    with pytest.raises(UserError, match=r"mytask\.yaml: unknown key 'text'"):
        resolve_task(spec_file)
    spec_file.write_text("name: mine\nformat: tsv\ntrain: a.tsv\nheader: false\ntext_a: text\n")
    with pytest.raises(UserError, match=r"mytask\.yaml: task mine: without a header, text_a must be a column"):
        resolve_task(spec_file)
    with pytest.raises(UserError, match="recipe file not found"):
        resolve_task(str(tmp_path / "missing.yaml"))


def test_regression_spec_on_synthetic_stsb(tmp_path):
    d = tmp_path / "glue" / "STS-B"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text(
        "genre\tsentence1\tsentence2\tscore\n"
        "main\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
        "main\tA man plays a flute.\tA man plays a bamboo flute.\t3.800\n"
        "main\tA cat.\tA dog.\t0\n"
    )
    spec = builtin_task("stsb")
    assert spec.is_regression and spec.num_labels == 1
    loaded = load_split(spec, "train", tmp_path)
    assert [e.label for e in loaded.examples] == [5.0, 3.8, 0.0]
    assert all(isinstance(e.label, float) for e in loaded.examples)
    assert loaded.examples[1].text_b == "A man plays a bamboo flute."
    (d / "dev.tsv").write_text("genre\tsentence1\tsentence2\tscore\nmain\tA.\tB.\tn/a\nmain\tA.\tB.\tnan\n")
    with pytest.raises(UserError, match=r"dev\.tsv:2: label 'n/a' is not a finite number"):
        load_split(spec, "dev", tmp_path)
    spec.skip_bad_rows = True
    assert load_split(spec, "dev", tmp_path).skipped_reasons == {"bad label": 2}


def test_datasets_format_reads_local_files(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"t": "good film", "y": "pos"}\n{"t": "bad film", "y": "neg"}\n{"t": "", "y": "neg"}\n')
    spec = from_dict(
        TaskSpec,
        {
            "name": "hfjson",
            "format": "datasets",
            "hf_name": "json",
            "train": str(path),
            "text_a": "t",
            "label": "y",
            "labels": ["neg", "pos"],
        },
    )
    with pytest.raises(UserError, match=r"d\.jsonl:3: empty text in column 't'"):
        load_split(spec, "train")
    spec.skip_bad_rows = True
    loaded = load_split(spec, "train")
    assert [(e.text_a, e.label) for e in loaded.examples] == [("good film", 1), ("bad film", 0)]
    assert loaded.skipped_reasons == {"empty text": 1}


def test_task_spec_validation_and_registry(monkeypatch, tmp_path):
    assert set(BUILTIN_TASKS) == {"sst2", "rte", "mrpc", "cola", "imdb", "amazon_books", "stsb"}
    assert resolve_task("SST-2").name == "sst2" and resolve_task("amazon-books").name == "amazon_books"
    with pytest.raises(UserError, match=r"^unknown task 'mnli' \(built-in: sst2, rte"):
        resolve_task("mnli")
    spec = builtin_task("rte")
    spec.skip_bad_rows = True
    assert builtin_task("rte").skip_bad_rows is False  # each call is a fresh copy
    for name, spec in BUILTIN_TASKS.items():
        spec.validate()
        from_dict(TaskSpec, {k: v for k, v in vars(spec).items()})  # every built-in round-trips through YAML
        assert name == spec.name
    bad = [
        ({"quoting": "csv"}, "glue_tsv never uses CSV quoting"),
        ({"train": None}, "at least one of"),
        ({"labels": ["0", "0"]}, "duplicates"),
        ({"encoding": "utf-99"}, "unknown encoding"),
        ({"format": "datasets"}, "needs hf_name"),
        ({"format": "jsonl", "header": False}, "only applies"),
    ]
    for change, message in bad:
        with pytest.raises(UserError, match=message):
            from_dict(TaskSpec, {"name": "t", "format": "glue_tsv", "train": "a.tsv", **change})
    monkeypatch.setenv("WELLREAD_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("WELLREAD_DATA")
    assert default_data_root() == Path(__file__).resolve().parents[2] / "shared" / "data"
