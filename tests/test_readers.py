"""Question-set readers: every format, auto detection, bad rows with file:line:field messages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rag_lightning.data.readers import (
    DataError,
    detect_format,
    read_questions,
    squad_article_split,
    squad_paragraphs,
    webquestions_answers,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Big_Cats",
            "paragraphs": [
                {
                    "context": "Lions live in Africa.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Where do lions live?",
                            "answers": [{"text": "Africa"}, {"text": "Africa"}],
                        },
                        {"id": "q2", "question": "What lives in Africa?", "answers": [{"text": "Lions"}]},
                    ],
                },
                {
                    "context": "Tigers live in Asia.",
                    "qas": [{"id": "q3", "question": "Tigers?", "answers": [{"text": "Asia"}]}],
                },
            ],
        },
        {"title": "Rivers", "paragraphs": [{"context": "The Nile is long.", "qas": []}]},
    ],
}


def test_dpr_csv(tmp_path: Path) -> None:
    p = _write(tmp_path / "nq-dev.csv", "who wrote \"it\"?\t['Stephen King', \"O'Neil\"]\nwhen\t['1988']\n")
    qa = read_questions(p, regex=True)
    assert detect_format(p) == "dpr_csv" and qa.regex and len(qa) == 2
    assert qa[0].question == 'who wrote "it"?'
    assert qa[0].answers == ["Stephen King", "O'Neil"] and (qa[1].line, qa[1].source) == (2, str(p))


def test_nq_open_and_generic_jsonl(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "nq.jsonl",
        '{"question": "q1", "answer": ["a", "b"]}\n\n{"question": "q2", "answer": ["c"]}\n',
    )
    qa = read_questions(p)
    assert [e.answers for e in qa] == [["a", "b"], ["c"]] and qa[1].line == 3
    p2 = _write(tmp_path / "x.jsonl", json.dumps({"q": "why?", "golds": ["because"], "id": 7}) + "\n")
    ex = read_questions(p2, fields={"question": "q", "answers": "golds"})[0]
    assert (ex.question, ex.answers, ex.id) == ("why?", ["because"], "7")


def test_csv_with_header(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "qa.csv",
        'question,answers\nq1,"[""a"", ""b""]"\nq2,"[\'c\', \'d\']"\nq3,single answer\n',
    )
    assert detect_format(p) == "csv"
    assert [e.answers for e in read_questions(p)] == [["a", "b"], ["c", "d"], ["single answer"]]
    t = _write(tmp_path / "qa.tsv", "id\tquery\tgold\n1\twho?\t['x']\n")
    ex = read_questions(t, fields={"question": "query", "answers": "gold"})[0]
    assert (ex.question, ex.answers, ex.line) == ("who?", ["x"], 2)


def test_squad(tmp_path: Path) -> None:
    p = _write(tmp_path / "dev.json", json.dumps(SQUAD))
    qa = read_questions(p)
    assert detect_format(p) == "squad" and len(qa) == 3
    assert qa[0].answers == ["Africa"] and qa[0].id == "q1" and qa[2].gold_ids == ["0-1"]
    paras = list(squad_paragraphs(p))
    assert [x["id"] for x in paras] == ["0-0", "0-1", "1-0"] and paras[0]["title"] == "Big Cats"
    with pytest.raises(DataError, match=rf"^{p}:0: field '<questions>': no questions read as 'squad'"):
        read_questions(p, articles=[1])  # article 1 has no questions: an empty selection is an error


def test_hf_dataset(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"q": ["a?", "b?"], "answers": [{"text": ["x"], "answer_start": [0]}] * 2}
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    qa = read_questions(tmp_path / "hf", fields={"question": "q"})
    assert detect_format(tmp_path / "hf") == "hf" and [e.answers for e in qa] == [["x"], ["x"]]
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "hfd"))
    assert len(read_questions(tmp_path / "hfd", "hf", fields={"question": "q"}, split="validation")) == 2


BAD = [
    (
        "a.jsonl",
        '{"question": "ok", "answers": ["x"]}\n{"question": "q", "answers": [\n',
        2,
        "<json>",
        "broken JSON",
    ),
    ("a.jsonl", '{"answers": ["x"]}\n', 1, "question", "missing field"),
    ("a.jsonl", '{"question": "q"}\n', 1, "answers", "missing field"),
    ("a.jsonl", '{"question": "  ", "answers": ["x"]}\n', 1, "question", "empty question"),
    ("a.jsonl", '{"question": "q", "answers": []}\n', 1, "answers", "empty answer list"),
    ("a.jsonl", '{"question": "q", "answers": 3}\n', 1, "answers", "wrong type int"),
    ("a.jsonl", '{"question": 5, "answers": ["x"]}\n', 1, "question", "wrong type int"),
    ("a.jsonl", '{"question": "q", "answers": [1]}\n', 1, "answers", "wrong type int"),
    ("a.csv", "q1\t['x']\nq2\t['x', \n", 2, "answers", "unparsable answer list"),
    ("a.csv", "q1\t['x']\nq2\t['x']\textra\n", 2, "answers", "expected 2 tab-separated columns, got 3"),
    ("a.csv", "q1\t['x']\nq2\t[]\n", 2, "answers", "empty answer list"),
    ("b.csv", "question,answers\nq,['x']\n,['y']\n", 3, "question", "empty question"),
    ("b.csv", "question,answers\nq,x,extra\n", 2, "question", "expected 2 columns, got 3"),
    ("b.csv", "query,answers\nq,x\n", 1, "question", "missing column in header"),
]


@pytest.mark.parametrize(("name", "text", "line", "field", "what"), BAD)
def test_bad_rows(tmp_path: Path, name: str, text: str, line: int, field: str, what: str) -> None:
    p = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=rf"^{p}:{line}: field '{field}': {what}"):
        read_questions(p)


def test_bad_squad(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(SQUAD))
    bad["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []
    p = _write(tmp_path / "dev.json", json.dumps(bad))
    with pytest.raises(DataError, match=rf"^{p}:2: field 'answers': empty answer list"):
        read_questions(p)
    p2 = _write(tmp_path / "broken.json", '{"data": [\n')
    with pytest.raises(DataError, match=rf"^{p2}:\d+: field '<json>': broken JSON"):
        read_questions(p2)


def test_skip_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        '{"question": "q1", "answers": ["a"]}',
        "{oops",
        '{"question": "", "answers": ["a"]}',
        '{"question": "q4", "answers": ["b"]}',
    ]
    p = _write(tmp_path / "s.jsonl", "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        qa = read_questions(p, skip_bad_rows=True)
    assert [e.question for e in qa] == ["q1", "q4"] and qa.skipped == 2
    assert qa.skip_messages[0].startswith(f"{p}:2:") and qa.skip_messages[1].startswith(
        f"{p}:3: field 'question'"
    )
    assert "skipped 2 bad rows" in caplog.text


def test_squad_article_split() -> None:
    s = squad_article_split(48)
    assert [len(s[k]) for k in ("train", "val", "test")] == [36, 6, 6]
    assert set(s["train"]) | set(s["val"]) | set(s["test"]) == set(range(48))
    assert not (set(s["train"]) & set(s["test"])) and s == squad_article_split(48)


# --- public files as published (fixtures written by hand in the exact published layout) -------------------
# brmson/dataset-factoid-curated large2180-test.tsv: id, type, question, answer_regex; no header, no quoting
# (these are four of its rows, plus one row in the layout of large2180-train.tsv:701, whose pattern holds a
# backslash-escaped tab)
TREC = (
    "1669\tfactoid\tHow tall is Mount McKinley?\t"
    r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t|6,194-meter|20,?237\s*f(oo|ee)?t|20,?073\s*f(oo|ee)?t|6,?168\s*m"
    "\n"
    '1962\tfactoid\tWhat country is know as the "Land of the Rising Sun"?\tJapan\n'
    "2380\tfactoid\tWhat is the name of the official residence of the President of France?\t[EÉ]lys[ée]e palace\n"
    "2387\tfactoid\tWhat is the highest mountain in the Czech Republic?\tSne[zž]ka|Sn\\ě\\žka\n"
    "462\tfactoid\tWhat is measured in curies?\tradiation|Sievert \\(Sv\\)\\\t1 Sv \\= 100 rem\n"
)


def test_curatedtrec_as_published(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _write(tmp_path / "large2180-test.tsv", TREC)
    with caplog.at_level(logging.WARNING):
        qa = read_questions(p)  # auto: no header, 4 columns, numeric id, lowercase type
    assert detect_format(p) == "curatedtrec" and qa.regex and len(qa) == 5 and qa.skipped == 0
    assert [e.id for e in qa] == ["1669", "1962", "2380", "2387", "462"] and [e.line for e in qa] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert (
        qa[1].question == 'What country is know as the "Land of the Rising Sun"?'
    )  # quotes kept as they are
    assert qa[2].answers == ["[EÉ]lys[ée]e palace"]  # a pattern starting with '[' is not a list
    assert qa[4].answers == ["radiation|Sievert \\(Sv\\)\\\t1 Sv \\= 100 rem"]  # the rest of the line
    # valid as written, invalid after NFD: never matches under DPR / DrQA scoring, said at load
    assert f"{p}:4: field 'answer_regex': pattern 'Sne[zž]ka|Sn\\\\ě\\\\žka' is invalid after" in caplog.text
    assert not read_questions(p, regex=False).regex  # an explicit regex=False wins
    for name in ("curated-test.tsv", "curated-train.tsv", "x.txt"):  # both published layouts, any extension
        assert len(read_questions(_write(tmp_path / name, TREC), "curatedtrec")) == 5


def test_regex_answers_without_regex_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dpr = "".join(
        f"q{i}\t[{json.dumps(a)}]\n" for i, a in enumerate([r"18\d\d", "Paris", r"Sept?(ember)?|Feb"])
    )
    p = _write(tmp_path / "curatedtrec-test.csv", dpr)
    with caplog.at_level(logging.WARNING):
        qa = read_questions(p)
    assert not qa.regex and "2 of 3 questions have answers that look like regular expressions" in caplog.text
    assert "line 1: '18\\\\d\\\\d'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert read_questions(p, regex=True).regex
        read_questions(_write(tmp_path / "plain.jsonl", '{"question": "q", "answers": ["Z[i]", "x"]}\n' * 1 +
                              '{"question": "q", "answers": ["y"]}\n' * 30))  # fmt: skip
    assert "look like regular expressions" not in caplog.text  # 1 of 31 plain answers: no warning


TRIVIA = {
    "Data": [
        {
            "Answer": {
                "Aliases": ["Sunset Blvd", "West Sunset Boulevard", "Sunset Boulevard", "Sunset Blvd."],
                "MatchedWikiEntityName": "Sunset Boulevard",
                "NormalizedAliases": ["west sunset boulevard", "sunset blvd", "sunset boulevard"],
                "NormalizedMatchedWikiEntityName": "sunset boulevard",
                "NormalizedValue": "sunset boulevard",
                "Type": "WikipediaEntity",
                "Value": "Sunset Boulevard",
            },
            "EntityPages": [{"DocSource": "TagMe", "Filename": "Andrew_Lloyd_Webber.txt", "Title": "A L W"}],
            "Question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
            "QuestionId": "tc_33",
            "QuestionSource": "http://www.triviacountry.com/",
            "SearchResults": [{"Description": "...", "Filename": "35/35_995.txt", "Rank": 0, "Title": "t"}],
        },
        {
            "Answer": {"Aliases": ["6"], "NormalizedAliases": ["6"], "Type": "Numerical", "Value": "six"},
            "EntityPages": [],
            "Question": "How many wives did Henry VIII have?",
            "QuestionId": "qb_1",
            "QuestionSource": "http://www.quizballs.com/",
        },
    ],
    "Domain": "Web",
    "VerifiedEval": False,
    "Version": 1.0,
}


def test_triviaqa_as_published(tmp_path: Path) -> None:
    p = _write(tmp_path / "unfiltered-web-dev.json", json.dumps(TRIVIA, indent=2))
    qa = read_questions(p)
    assert detect_format(p) == "triviaqa" and len(qa) == 2 and not qa.regex
    assert qa[0].answers == ["Sunset Boulevard", "Sunset Blvd", "West Sunset Boulevard", "Sunset Blvd."]
    assert (qa[0].id, qa[0].line, qa[1].answers) == ("tc_33", 1, ["six", "6"])  # Value first: the target
    verified = json.loads(json.dumps(TRIVIA))
    verified["VerifiedEval"] = True
    verified["Data"][0].update(QuestionPartOfVerifiedEval=False, QuestionVerifiedEvalAttempt=True)
    verified["Data"][1].update(QuestionPartOfVerifiedEval=True, QuestionVerifiedEvalAttempt=True)
    v = _write(tmp_path / "verified-web-dev.json", json.dumps(verified))
    assert [e.id for e in read_questions(v)] == ["qb_1"]  # as the official reader: verified questions only
    assert len(read_questions(v, verified_only=False)) == 2
    del verified["Data"][1]["Answer"]
    v = _write(tmp_path / "verified-web-dev.json", json.dumps(verified))
    with pytest.raises(DataError, match=rf"^{v}:2: field 'Answer': missing field \(a test file without"):
        read_questions(v)


WEBQ = (
    "[\n"
    '{"url": "http://www.freebase.com/view/en/justin_bieber", "targetValue": "(list (description \\"Jazmyn '
    'Bieber\\") (description \\"Jaxon Bieber\\"))", "utterance": "what is the name of justin bieber brother?"},\n'
    '{"url": "http://www.freebase.com/view/en/natalie_portman", "targetValue": "(list (description \\"Padm\\u00e9'
    ' Amidala\\"))", "utterance": "what character did natalie portman play in star wars?"},\n'
    '{"url": "http://www.freebase.com/view/en/twilight", "targetValue": "(list (description Abduction) '
    '(description Eclipse) (description \\"Valentine\'s Day\\"))", "utterance": "what movies has taylor '
    'lautner been in?"}\n'
    "]\n"
)


def test_webquestions_as_published(tmp_path: Path) -> None:
    p = _write(tmp_path / "webquestions.examples.test.json", WEBQ)
    qa = read_questions(p)
    assert detect_format(p) == "webquestions" and len(qa) == 3
    assert [e.answers for e in qa] == [
        ["Jazmyn Bieber", "Jaxon Bieber"],
        ["Padmé Amidala"],
        ["Abduction", "Eclipse", "Valentine's Day"],
    ]
    assert qa[0].question == "what is the name of justin bieber brother?" and qa[2].line == 3
    assert qa[0].id == "http://www.freebase.com/view/en/justin_bieber"
    assert webquestions_answers(r'(list (description "say \"hi\"") (description 1981))') == [
        'say "hi"',
        "1981",
    ]
    bad = _write(tmp_path / "w.json", WEBQ.replace("(list (description Abduction)", "(set (description A)"))
    with pytest.raises(DataError, match=rf"^{bad}:3: field 'targetValue': expected '\(list"):
        read_questions(bad)


def test_dpr_retriever_json(tmp_path: Path) -> None:
    ctx = {"title": "Does He Love You", "text": "...", "score": 1000, "title_score": 1}
    recs = [
        {
            "dataset": "nq_dev_psgs_w100",
            "question": "who sings does he love me with reba",
            "answers": ["Linda Davis"],
            "positive_ctxs": [{**ctx, "passage_id": "11828866"}, {**ctx, "passage_id": "11828871"}],
            "negative_ctxs": [{**ctx, "passage_id": "1"}],
            "hard_negative_ctxs": [],
        },
        {"question": "q2", "answers": ["a"], "positive_ctxs": [{**ctx, "psg_id": 7}], "negative_ctxs": []},
        {"question": "q3", "answers": ["b"], "positive_ctxs": [], "negative_ctxs": []},
    ]
    p = _write(tmp_path / "nq-dev.json", json.dumps(recs, indent=4))
    qa = read_questions(p)
    assert detect_format(p) == "dpr_json" and len(qa) == 3
    assert [e.gold_ids for e in qa] == [["11828866", "11828871"], ["7"], []]
    assert qa[0].answers == ["Linda Davis"] and qa[1].line == 2


# --- bad input at load time: BOM, bytes that are not UTF-8, invalid regexes, empty sets ---------------------
BOM = "\ufeff"


@pytest.mark.parametrize(
    ("name", "text", "fmt"),
    [
        ("a.jsonl", '{"question": "q1", "answers": ["x"]}\n', "jsonl"),
        ("a.csv", 'question,answers\nq1,"[""x""]"\n', "csv"),
        ("a.tsv", "question\tanswers\nq1\t['x']\n", "csv"),
        ("nq-test.csv", "q1\t['x']\n", "dpr_csv"),
        ("t.tsv", "1\tfactoid\tq1\tx\n", "curatedtrec"),
        ("a.json", '[{"question": "q1", "answers": ["x"]}]', "json"),
        ("w.json", WEBQ, "webquestions"),
        ("t.json", json.dumps(TRIVIA), "triviaqa"),
    ],
)
def test_bom_accepted(tmp_path: Path, name: str, text: str, fmt: str) -> None:
    p = _write(tmp_path / name, BOM + text)
    qa = read_questions(p)
    assert detect_format(p) == fmt and not qa[0].question.startswith(BOM)
    assert qa[0].question in (
        "q1",
        "what is the name of justin bieber brother?",
        TRIVIA["Data"][0]["Question"],
    )


LATIN1 = "caf\xe9".encode("latin-1")  # b"caf\xe9": not UTF-8
ENC = [
    ("a.jsonl", b'{"question": "q1", "answers": ["x"]}\n{"question": "' + LATIN1 + b'", "answers": ["x"]}\n', 2,
     "<encoding>", "not UTF-8: byte 0xe9 at column 18"),
    ("nq-test.csv", b"q1\t['x']\nq2\t['" + LATIN1 + b"']\n", 2, "answers", "not UTF-8: byte 0xe9"),
    ("a.csv", b"question,answers\nq1,x\n" + LATIN1 + b",x\n", 3, "question", "not UTF-8: byte 0xe9"),
    ("t.tsv", b"1\tfactoid\tq1\tx\n2\tfactoid\t" + LATIN1 + b"?\tx\n", 2, "question", "not UTF-8: byte 0xe9"),
    ("a.json", b'[{"question": "q1", "answers": ["x"]},\n {"question": "q2", "answers": ["' + LATIN1 + b'"]}]', 2,
     "<encoding>", "not UTF-8: byte 0xe9 at column 37"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "line", "field", "what"), ENC)
def test_encoding_errors_name_file_line_field(tmp_path: Path, name, raw, line, field, what) -> None:
    p = tmp_path / name
    p.write_bytes(raw)
    with pytest.raises(DataError, match=rf"^{p}:{line}: field '{field}': {what}"):
        read_questions(p)
    qa = read_questions(p, skip_bad_rows=True)  # the bad row is skipped, the good one kept
    assert qa.skipped == 1 and [e.question for e in qa] == ["q1"] and f"{p}:" in qa.skip_messages[0]


def test_invalid_regex_fails_at_load(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.tsv", "1\tfactoid\tq1\tJapan\n2\tfactoid\tq2\t(Paris|Lyon\n")
    with pytest.raises(
        DataError, match=rf"^{p}:2: field 'answer_regex': invalid regex answer pattern '\(Paris"
    ):
        read_questions(p)
    j = _write(tmp_path / "r.jsonl", '{"question": "q", "answers": ["ok", "a[b"]}\n')
    with pytest.raises(DataError, match=rf"^{j}:1: field 'answers': invalid regex answer pattern 'a\[b'"):
        read_questions(j, regex=True)
    assert len(read_questions(j)) == 1  # as strings they are fine
    assert len(read_questions(p, skip_bad_rows=True)) == 1


def test_empty_sets_are_errors(tmp_path: Path) -> None:
    for name, text in [("e.jsonl", ""), ("e.csv", "q\t['a']\n\n" * 0), ("b.jsonl", BOM + "\n\n")]:
        p = _write(tmp_path / name, text)
        with pytest.raises(DataError, match=rf"^{p}:0: field '<questions>': no questions read"):
            read_questions(p, "jsonl" if name.endswith("jsonl") else "dpr_csv")
    for name in ("e.tsv", "f.csv"):  # auto-detected as csv with a header: still "no questions"
        p = _write(tmp_path / name, BOM)
        with pytest.raises(DataError, match=rf"^{p}:0: field '<questions>': no questions read as 'csv'"):
            read_questions(p)
    p = _write(tmp_path / "bad.jsonl", '{"question": ""}\n{oops\n')
    with pytest.raises(DataError, match=rf"^{p}:0: field '<questions>': .*all 2 rows were bad and skipped"):
        read_questions(p, skip_bad_rows=True)
