"""CheXpert Plus: report table -> 5 QA pairs per report, by the deterministic rules (grounded in the report)
or an OpenAI-compatible endpoint (a local test server: JSON schema, retries, rate limit, cache, key handling)."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from conftest import prepare_dataset, rows
from medlava.config import LlmQAConfig
from medlava.data.qa import LlmQA, QAGenerationError, RateLimit, rules_qa
from medlava.io import InputError
from synthetic.chexpert_plus import CSV, make_synthetic_chexpert_plus

SECRET = "sk-test-not-a-real-key-4242"


def prepare(tmp: Path, root: Path, *overrides: str, run_id: str = "r") -> Path:
    return prepare_dataset(
        "chexpert_plus",
        tmp,
        root,
        f"data.image_root={root / 'PNG'}",
        "data.split_ratios=[0.5,0.25,0.25]",
        *overrides,
        run_id=run_id,
    )


@pytest.fixture(scope="module")
def plus(tmp_path_factory) -> Path:
    return make_synthetic_chexpert_plus(tmp_path_factory.mktemp("cxp") / "chexpert-plus")


def test_rules_qa_is_grounded_in_the_report():
    qa = rules_qa(
        "There is a small left pleural effusion. The heart is moderately enlarged. No pneumothorax.",
        "Possible right lower lobe pneumonia.",
    )
    assert [(q.question, q.answer) for q in qa] == [
        ("Is there a pleural effusion?", "Yes. There is a small left pleural effusion."),
        ("Where is the pleural effusion?", "Left."),
        ("How severe is the pleural effusion?", "Small."),
        ("Is there cardiomegaly?", "Yes. The heart is moderately enlarged."),
        ("How severe is the cardiomegaly?", "Moderate."),
    ]
    assert qa[0].choices == ["Yes", "No"] and qa[0].label == "Yes" and qa[1].choices is None
    more = rules_qa("No pneumothorax.", "Possible right lower lobe pneumonia.", n=10)
    assert [(q.kind, q.answer) for q in more] == [
        ("presence", "No. No pneumothorax."),
        ("presence", "Possibly. Possible right lower lobe pneumonia."),
        ("findings", "No pneumothorax."),
        ("impression", "Possible right lower lobe pneumonia."),
    ]
    assert [q.kind for q in rules_qa("", "No acute process.")] == ["impression"]


def test_reports_become_five_qa_pairs(plus, tmp_path):
    run = prepare(tmp_path, plus)
    csv = pd.read_csv(plus / CSV)
    n_reports = csv.drop_duplicates(["deid_patient_id", "patient_report_date_order"]).shape[0]
    out = rows(run)
    summary = json.loads((run / "dataset.json").read_text())
    assert summary["reports"] == n_reports and summary["qa_counts"] == {"qa_5": n_reports}
    patients = [{r["meta"]["group"] for r in v} for v in out.values()]
    assert not any(a & b for a, b in itertools.combinations(patients, 2)) and all(patients)
    # train: one 5-turn conversation per report; val/test: one sample per question
    assert all(len(r["conversations"]) == 10 for r in out["train"])
    assert len(out["val"]) + len(out["test"]) == 5 * (n_reports - len(out["train"]))
    frontal = set(csv.loc[csv["frontal_lateral"] == "Frontal", "path_to_image"].str.replace(".jpg", ".png"))
    for s, rs in out.items():
        for r in rs:
            assert r["image"] in frontal and (plus / "PNG" / r["image"]).is_file()  # the PNG release's file
            assert r["conversations"][0]["value"].startswith("<image>\n")
            assert sum("<image>" in c["value"] for c in r["conversations"]) == 1
            if s != "train":
                m = r["meta"]
                assert m["task"] == ("closed" if m.get("choices") else "open")
                assert m["answer"] in (m.get("choices") or [r["conversations"][1]["value"]])
    report = csv.set_index(csv["deid_patient_id"] + "-" + csv["patient_report_date_order"].astype(str))
    for r in out["train"]:
        text = " ".join(str(report.loc[r["id"]].iloc[0][c]) for c in ("section_findings", "section_impression"))
        for turn in r["conversations"][1::2]:
            words = turn["value"].removeprefix("Yes. ").removeprefix("No. ").removeprefix("Possibly. ").rstrip(".")
            assert words.lower() in " ".join(text.lower().split())  # every answer is the report's own words


def test_bad_rows(plus, tmp_path):
    root = tmp_path / "bad"
    make_synthetic_chexpert_plus(root)
    csv = pd.read_csv(root / CSV)
    csv.loc[0, ["section_findings", "section_impression"]] = None  # an empty report (its frontal row)
    csv.loc[2, "frontal_lateral"] = "Oblique"
    csv.loc[4, "path_to_image"] = "../../etc/passwd.jpg"
    csv.to_csv(root / CSV, index=False)
    with pytest.raises(InputError, match=rf"{CSV} row 3: frontal_lateral 'Oblique'"):
        prepare(tmp_path, root, run_id="a")
    run = prepare(tmp_path, root, "data.skip=[empty_report,unknown_label,image_outside_root]", run_id="b")
    skipped = json.loads((run / "dataset.json").read_text())["skipped"]
    assert {k: v for k, v in skipped.items() if v} == {"empty_report": 1, "unknown_label": 1, "image_outside_root": 1}


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1; `script` says how to answer each request."""

    script: list[str] = []
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"t": time.monotonic(), "auth": self.headers.get("Authorization"), "body": body})
        how = type(self).script.pop(0) if type(self).script else "ok"
        if how == "500":
            self.send_response(500)
            self.end_headers()
            return
        n = body["response_format"]["json_schema"]["schema"]["properties"]["qa"]["minItems"]
        report = body["messages"][1]["content"]
        content = (
            "not json"
            if how == "garbage"
            else json.dumps(
                {"qa": [{"question": f"Q{i} about {report.split()[3]}?", "answer": f"A{i}"} for i in range(n)]}
            )
        )
        reply = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    _Endpoint.script, _Endpoint.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_llm_generator_retries_limits_rate_and_caches(plus, tmp_path, endpoint, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("QA_KEY", SECRET)
    _Endpoint.script = ["500", "garbage"]  # one HTTP error (client retry), one reply that is not the JSON asked for
    llm = [
        "data.chexpert_plus.generator=llm",
        f"data.chexpert_plus.llm={{base_url: '{endpoint}', model: m1, "
        f"api_key_env: QA_KEY, requests_per_minute: 600, concurrency: 2, max_retries: 2, "
        f"cache_dir: '{tmp_path / 'cache'}'}}",
    ]
    run = prepare(tmp_path, plus, *llm, run_id="llm1")
    n_reports = json.loads((run / "dataset.json").read_text())["reports"]
    seen = _Endpoint.seen
    assert len(seen) == n_reports + 2 and all(s["auth"] == f"Bearer {SECRET}" for s in seen)
    fmt = seen[0]["body"]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["properties"]["qa"]["maxItems"] == 5
    starts = sorted(s["t"] for s in seen)
    assert starts[-1] - starts[0] >= 0.1 * (len(seen) - 2)  # 600/min: one start every 0.1 s, 2 threads or not
    train = rows(run)["train"]
    assert train and all(len(r["conversations"]) == 10 and r["meta"]["generator"] == "llm" for r in train)
    csv = pd.read_csv(plus / CSV)
    first = csv.set_index(csv["deid_patient_id"] + "-" + csv["patient_report_date_order"].astype(str))
    for r in train:  # the pairs the endpoint made for this report (it echoes the findings' first word)
        word = first.loc[r["id"]].iloc[0]["section_findings"].split()[0]
        assert [c["value"] for c in r["conversations"][:2]] == [f"<image>\nQ0 about {word}?", "A0"]
    # a re-run is answered from the cache: no request at all
    before = len(seen)
    assert rows(prepare(tmp_path, plus, *llm, run_id="llm2")) == rows(run)
    assert len(_Endpoint.seen) == before
    # the key is never written or logged
    written = "".join(
        p.read_text(errors="replace")
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".log")
    )
    assert SECRET not in written and SECRET not in caplog.text and "QA_KEY" in written


def test_rate_limit_spaces_request_starts_across_threads():
    limit, starts = RateLimit(1200), []  # one start every 50 ms
    threads = [threading.Thread(target=lambda: (limit.wait(), starts.append(time.monotonic()))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.045


def test_llm_generator_gives_up_with_a_clear_error(tmp_path, endpoint):
    _Endpoint.script = ["garbage"] * 3
    gen = LlmQA(LlmQAConfig(base_url=endpoint, model="m", max_retries=1, requests_per_minute=6000), tmp_path / "c")
    with pytest.raises(QAGenerationError, match=r"report r1: .* \(m\): the reply was not the requested JSON after 2"):
        gen.generate("r1", "FINDINGS: x")
    dead = LlmQA(LlmQAConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0), tmp_path / "c")
    with pytest.raises(
        QAGenerationError,
        match=r"report r2: http://127.0.0.1:9/v1 \(m\): APIConnectionError: .* "
        r"after 1 attempts",
    ):
        dead.generate("r2", "FINDINGS: x")
