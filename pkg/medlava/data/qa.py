"""Question-answer pairs from a radiology report (seed 002: five per report).

`rules_qa` is the embedded default: deterministic, every answer grounded in the report's own sentences —
presence of each CheXpert observation the labeler finds (yes / no / possibly, with the sentence that says
so), then its location and severity when that sentence states them. `LlmQA` asks any OpenAI-compatible
endpoint (a vLLM server) for the pairs under a JSON schema, with retries, a rate limit and an on-disk cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from medlava.config import LlmQAConfig
from medlava.data.chexpert import (
    NEGATIVE,
    NO_FINDING,
    OBSERVATIONS,
    POSITIVE,
    label_report,
)
from medlava.io import InputError, atomic_write_json

log = logging.getLogger(__name__)

YES_NO = ["Yes", "No"]
_PHRASE = {
    "Enlarged Cardiomediastinum": "an enlarged cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Lesion": "a lung lesion",
    "Lung Opacity": "a lung opacity",
    "Edema": "pulmonary edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "a pneumothorax",
    "Pleural Effusion": "a pleural effusion",
    "Pleural Other": "another pleural abnormality",
    "Fracture": "a fracture",
    "Support Devices": "a support device",
}
_SIDE = r"(?:left|right|bilateral|both)"
_LOCATION = re.compile(
    rf"\b(?:{_SIDE}\s+)?(?:(?:upper|middle|lower|mid)\s+(?:lobes?|lungs?|zones?)|(?:lung\s+)?"
    r"(?:bases?|apex|apices|apical)|lingula|retrocardiac|perihilar|hilar|basilar|bibasilar|"
    rf"costophrenic angles?)\b|\b{_SIDE}\b",
    re.IGNORECASE,
)
_SEVERITY = re.compile(
    r"\b(trace|tiny|small|minimal|mild|moderate|moderately|large|severe|severely|massive|"
    r"extensive|marked|markedly)\b",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # presence | location | severity | findings | impression | llm
    choices: list[str] | None = None  # closed (yes/no) questions
    label: str | None = None  # the closed answer among choices


def _mentions(text: str) -> dict[str, tuple[int, str]]:
    """Observation -> (label, first sentence mentioning it), from the labeler run sentence by sentence."""
    found: dict[str, tuple[int, str]] = {}
    for sentence in _SENTENCE.split(" ".join(text.split())):
        for obs, label in zip(OBSERVATIONS, label_report(sentence)):
            if obs != NO_FINDING and label is not None and obs not in found:
                found[obs] = (label, sentence)
    return found


def rules_qa(findings: str, impression: str, n: int = 5) -> list[QA]:
    """Up to `n` pairs: positive findings first (presence, location, severity), then negatives, uncertain
    ones, and the findings / impression text itself; fewer when the report says less."""
    text = " ".join(p for p in (findings, impression) if p)
    report_labels = dict(zip(OBSERVATIONS, label_report(text)))
    positive, negative, uncertain = [], [], []
    for obs, (_, sentence) in _mentions(text).items():
        name, label = obs.lower(), report_labels[obs]
        q = f"Is there {_PHRASE[obs]}?"
        if label == POSITIVE:
            positive.append(QA(q, f"Yes. {sentence}", "presence", YES_NO, "Yes"))
            where = _LOCATION.search(sentence)
            if where:
                positive.append(QA(f"Where is the {name}?", f"{where.group(0).capitalize()}.", "location"))
            severity = _SEVERITY.search(sentence)
            if severity:
                word = severity.group(0).lower().removesuffix("ly")  # "moderately enlarged" -> moderate
                positive.append(QA(f"How severe is the {name}?", f"{word.capitalize()}.", "severity"))
        elif label == NEGATIVE:
            negative.append(QA(q, f"No. {sentence}", "presence", YES_NO, "No"))
        else:
            uncertain.append(QA(q, f"Possibly. {sentence}", "presence"))
    rest = [QA("What are the findings?", findings, "findings")] if findings else []
    rest += [QA("What is the impression?", impression, "impression")] if impression else []
    return (positive + negative + uncertain + rest)[:n]


SYSTEM = (
    "You write question-answer pairs about a chest X-ray for training a vision-language model. Use only "
    "facts stated in the radiology report; answers are short and never add findings the report lacks."
)


def qa_schema(n: int) -> dict:
    pair = {
        "type": "object",
        "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["question", "answer"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"qa": {"type": "array", "items": pair, "minItems": n, "maxItems": n}},
        "required": ["qa"],
        "additionalProperties": False,
    }


class RateLimit:
    """Request starts at least 60/per_minute seconds apart across threads (hand-written: five lines)."""

    def __init__(self, per_minute: float):
        self.interval, self.next, self.lock = 60.0 / per_minute, 0.0, threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(start - now)


class QAGenerationError(InputError):
    """The endpoint gave no valid answer after all retries."""


class LlmQA:
    """Pairs from an OpenAI-compatible chat endpoint with `response_format` json_schema (vLLM, OpenAI).
    Answers are cached by a hash of everything that shapes them, so a re-run sends nothing. The API key is
    read from the environment variable the config names and is never logged or written."""

    def __init__(self, cfg: LlmQAConfig, cache_dir: Path, n: int = 5):
        from openai import OpenAI

        self.cfg, self.n, self.cache_dir = cfg, n, Path(cache_dir)
        # vLLM without --api-key accepts any key; the client insists on one. Retries are ours (below), so
        # that every attempt waits for the rate limit.
        self.client = OpenAI(
            base_url=cfg.base_url,
            api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
            max_retries=0,
            timeout=cfg.timeout_s,
        )
        self.limit = RateLimit(cfg.requests_per_minute)
        self.requests = 0

    def _request(self, report: str) -> dict:
        return {
            "model": self.cfg.model,
            "temperature": self.cfg.temperature,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {
                    "role": "user",
                    "content": f"Radiology report:\n{report}\n\nWrite exactly {self.n} "
                    "question-answer pairs about this X-ray as JSON.",
                },
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "qa_pairs", "schema": qa_schema(self.n), "strict": True},
            },
        }

    def _valid(self, content: str | None) -> list[QA] | None:
        try:
            pairs = json.loads(content or "")["qa"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        if not isinstance(pairs, list) or len(pairs) != self.n:
            return None
        out = [
            QA(str(p.get("question", "")).strip(), str(p.get("answer", "")).strip(), "llm")
            for p in pairs
            if isinstance(p, dict)
        ]
        return out if len(out) == self.n and all(q.question and q.answer for q in out) else None

    def generate(self, report_id: str, report: str) -> list[QA]:
        import openai

        request = self._request(report)
        key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        cached = self.cache_dir / key[:2] / f"{key}.json"
        if cached.exists():
            return [QA(**q) for q in json.loads(cached.read_text())["qa"]]
        reason = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))  # exponential back-off, as the client's own
            self.limit.wait()
            self.requests += 1
            try:
                reply = self.client.chat.completions.create(**request)
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                reason = f"{type(e).__name__}: {e}"  # transient: retried
                continue
            except openai.APIError as e:
                raise QAGenerationError(
                    f"report {report_id}: {self.cfg.base_url} ({self.cfg.model}) refused the "
                    f"request: {type(e).__name__}: {e}"
                ) from None
            qa = self._valid(reply.choices[0].message.content if reply.choices else None)
            if qa:
                atomic_write_json(
                    cached, {"report_id": report_id, "model": self.cfg.model, "qa": [asdict(q) for q in qa]}
                )
                return qa
            reason = "the reply was not the requested JSON"
        raise QAGenerationError(
            f"report {report_id}: {self.cfg.base_url} ({self.cfg.model}): {reason} after "
            f"{self.cfg.max_retries + 1} attempts"
        )

    def generate_all(self, reports: list[tuple[str, str]]) -> list[list[QA]]:
        """Pairs for each (report_id, text), in order, `concurrency` requests at a time."""
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            return list(
                tqdm(
                    pool.map(lambda r: self.generate(*r), reports),
                    total=len(reports),
                    desc="LLM QA",
                    unit="report",
                    mininterval=5,
                )
            )
