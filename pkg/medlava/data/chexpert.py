"""A rule-based CheXpert labeler: 14 observations per radiology report, 1 / 0 / -1 / blank.

Hand-written because the CheXpert labeler needs Java, a constituency-parser model and NegBio (its rules
run on dependency graphs); this one applies the same stages to surface text with precompiled regular
expressions, so it installs with pip and labels ~10,000 reports a second. It is *not* the CheXpert
labeler nor CheXbert: results are named `chexpert_rules` wherever they are written.

Stages, as the CheXpert labeler's:
1. mention extraction: phrase lists per observation, matched as whole words in each sentence
   (an unmention list removes look-alikes such as "pericardial effusion");
2. classification of each mention, first rule that fires: pre-negation uncertainty ("cannot exclude X",
   "X is not excluded", "no new X") -> uncertain; negation ("no X", "without X", "X is normal", "X has
   resolved") -> negative; post-negation uncertainty ("may represent X", "possible X", "X versus Y",
   "stable cardiac silhouette") -> uncertain; else positive. Cues act within the clause of the mention
   (cut at ".", ";", "but", "however", "which", "there is", ...), NegEx-style;
3. aggregation per report: one mention -> its label; negative + uncertain -> uncertain; positive with
   anything -> positive; "chf" / "heart failure" (positive or uncertain) also add uncertain Cardiomegaly;
   No Finding = 1 when no observation other than Support Devices has a positive or uncertain mention
   (an empty report included), else blank.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd
from tqdm import tqdm

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"
OBSERVATIONS = (
    NO_FINDING,
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    SUPPORT_DEVICES,
)
FIVE = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")  # the CheXpert competition set
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
LABELER = "medlava chexpert_rules v1 (rule-based, CheXpert-style; not CheXbert)"

_OPACITIES = r"opacit(?:y|ies)"
# Regex fragments, lower case. Order inside a group does not matter: the alternation is leftmost-first
# and every fragment is specific enough not to be a prefix of another group's phrase.
_MENTIONS: dict[str, tuple[str, ...]] = {
    "_unmention": (r"pericardial effusions?", r"joint effusions?"),
    "Enlarged Cardiomediastinum": (
        r"cardiomediastinal (?:silhouette|contours?|shadow|size|configuration|width)s?",
        r"cardiomediastinum",
        r"mediastin(?:um|al) (?:and hilar )?(?:silhouette|contours?|widening|enlargement|configuration|width)",
        r"(?:widen(?:ed|ing)|enlarged|prominent) (?:the )?(?:superior )?mediastinum",
        r"mediastinal (?:widening|enlargement|prominence)",
    ),
    "Cardiomegaly": (
        r"cardiomegaly",
        r"heart size",
        r"size of the heart",
        r"cardiac (?:enlargement|silhouette|size|shadow|contour)",
        r"enlarged (?:heart|cardiac silhouette)",
        r"heart (?:is )?enlarged",
        r"enlargement of the (?:heart|cardiac silhouette)",
        r"heart(?= (?:is|appears|remains|has) )",
    ),
    "Lung Lesion": (
        r"mass(?:es)?",
        r"nodul(?:e|es)",
        r"nodular (?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)",
        r"(?:lung|pulmonary|cavitary|cavitating) lesions?",
        r"tumou?rs?",
        r"neoplasms?",
        r"carcinomas?",
        r"cavitation",
        r"metastas[ie]s",
        r"metastatic disease",
    ),
    "Lung Opacity": (
        _OPACITIES,
        r"opacification",
        r"opacified",
        r"infiltrat(?:e|es|ion|ions)",
        r"air ?space disease",
        r"haziness",
        r"hazy",
        r"interstitial (?:markings?|abnormalit(?:y|ies)|prominence|thickening|lung disease)",
        r"reticula(?:r|tion)",
        r"ground[- ]glass",
        r"bronchial wall thickening",
        r"peribronchial cuffing",
    ),
    "Edema": (
        r"(?:pulmonary |interstitial |alveolar )?o?edema",
        r"(?:pulmonary )?vascular congestion",
        r"pulmonary congestion",
        r"(?:pulmonary )?vascular (?:prominence|engorgement|redistribution)",
        r"(?:congestive )?heart failure",
        r"chf",
        r"indistinct(?:ness)? (?:of the )?(?:pulmonary )?vascula(?:r|ture)",
        r"kerley b lines",
    ),
    "Consolidation": (r"consolidat(?:ion|ions|ive|ed)",),
    "Pneumonia": (r"(?:broncho)?pneumonias?", r"infection", r"infectious (?:process|etiology)"),
    "Atelectasis": (
        r"atelecta(?:sis|ses|tic)",
        r"(?:lung|lobe|lobar|segmental) collapse",
        r"collapse of the (?:\w+ )?(?:lung|lobe)",
        r"collapsed (?:lung|lobe)",
    ),
    "Pneumothorax": (r"(?:hydro)?pneumothora(?:x|ces)",),
    "Pleural Effusion": (
        r"(?:pleural )?effusions?",
        r"pleural fluid",
        r"hydrothorax",
        r"fluid in the pleural space",
        r"blunt(?:ed|ing) (?:of )?(?:the )?(?:\w+ )?costophrenic angles?",
        r"costophrenic angles? (?:is |are )?blunt(?:ed|ing)",
    ),
    "Pleural Other": (
        r"pleural (?:thickening|scarring|plaques?|calcifications?|abnormalit(?:y|ies))",
        r"fibrothorax",
        r"pleural[- ]parenchymal scarring",
        r"apical (?:pleural )?(?:cap|thickening)",
    ),
    "Fracture": (r"fractur(?:e|es|ed)",),
    SUPPORT_DEVICES: (
        r"(?:endotracheal|et|enteric|nasogastric|ng|og|orogastric|feeding|chest|tracheostomy|dobh?off) tubes?",
        r"tubes?",
        r"catheters?",
        r"picc(?: lines?)?",
        r"(?:central|venous|jugular|subclavian|midline|arterial|dialysis|"
        r"swan[- ]ganz) lines?",
        r"pacemakers?",
        r"pacer",
        r"(?:pacemaker|pacer|pacing) (?:leads?|wires?)",
        r"(?:sternotomy |sternal |surgical )?wires",
        r"(?:surgical )?clips",
        r"stents?",
        r"defibrillator",
        r"a?icd",
        r"(?:prosthetic|mechanical) (?:mitral |aortic )?valves?",
        r"valve replacement",
        r"drains?",
        r"port[- ]a[- ]cath",
        r"portacath",
        r"(?:chest|mediport|power) port",
        r"devices?",
        r"hardware",
        r"ecg leads",
        r"monitoring leads",
    ),
    # Only for the No Finding rule: a positive or uncertain "acute process" means there was a finding.
    NO_FINDING: (
        r"(?:acute )?cardiopulmonary (?:process|abnormalit(?:y|ies)|disease)",
        r"acute (?:process|abnormalit(?:y|ies)|disease|findings?)",
        r"abnormalit(?:y|ies)",
    ),
}
_GROUPS = list(_MENTIONS)
# One pattern, one group per observation; the word-boundary guards sit outside the alternation (2x faster).
_MENTION = re.compile(
    "(?<![a-z0-9])(?:"
    + "|".join(f"(?P<g{i}>{'|'.join(_MENTIONS[name])})" for i, name in enumerate(_GROUPS))
    + ")(?![a-z0-9])"
)

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+|(?<=[a-z])\.(?=[a-z]{2})")
_CLAUSE_END = re.compile(
    r"[;:]|\.(?!\d)|\b(?:but|however|although|though|which|whereas|except|aside from|apart from|"
    r"other than|there (?:is|are|has been|have been))\b"
)

# Pre-negation uncertainty: fires before negation ("cannot exclude" holds a negation cue).
_PRE_UNCERTAIN_BEFORE = re.compile(
    r"\b(?:can ?not|could not|can't|unable to|difficult to|not) (?:be )?(?:exclude[ds]?|ruled? out)\b|"
    r"\bno new (?:\w+ ){0,2}$|\bno new (?:area|areas|focus|foci|region) of\b|\bno evidence to rule out\b"
)
_PRE_UNCERTAIN_AFTER = re.compile(
    r"^[\s,]*(?:(?:is|are|was|were)\s+)?(?:not|cannot be|can ?not be|could not be|can't be) (?:entirely )?"
    r"(?:completely )?(?:excluded|ruled out)\b"
)
# Negation: wide cues govern the whole clause after them ("no focal consolidation, effusion, or pneumothorax");
# narrow cues only the next few words ("normal heart size" but not "normal lungs and enlarged heart").
_NEGATION_WIDE = re.compile(
    r"\b(?:(?:no|without)(?! (?:\w+ )?changes?\b)|negative for|free of|absence of|rule out|"
    r"ruled out|rules out|exclude[sd]?|excluding|neither|nor|never)\b"
)
_NEGATION_NARROW = re.compile(
    r"\b(?:normal|unremarkable|resolved|resolution of|resolving|interval removal of|removal of|cleared|clearing of|"
    r"clear of|history of|rather than|disappearance of|not|absent|negative)(?:\s+[a-z-]+){0,2}\s*,?\s*$"
)
_NEGATION_AFTER = re.compile(
    r"^[\s,]*(?:(?:is|are|was|were|has|have|had|appears?|remains?|seems?|looks?|been)\s+)*"
    r"(?:(?:now|again|otherwise|also|essentially|overall|grossly|entirely|completely|largely|within)\s+)*"
    r"(?:normal|unremarkable|normal limits|within normal limits|at (?:the )?upper limits? of normal|"
    r"not (?:enlarged|seen|identified|present|demonstrated|appreciated|noted|evident|detected|visible|widened)|"
    r"resolved|cleared|removed|absent|no longer)\b"
)
# Post-negation uncertainty.
_UNCERTAIN_BEFORE = re.compile(
    r"\b(?:may|might|could|would|can)\s+(?:also\s+)?(?:be|represent|reflect|indicate|include|relate|suggest|signify|"
    r"have|reflecting|obscure)\b|"
    r"\b(?:possible|possibly|probable|presumabl[ey]|questionable|question of|suspect|suspected|suspicious (?:for|of)|"
    r"suspicion (?:for|of)|concern(?:ing)? (?:for|of)|worrisome for|suggestive of|suggestion of|suggests?|"
    r"favou?r(?:ed|s|ing)?|consider(?:ed)?|differential (?:diagnosis )?(?:includes?|of)|versus|vs|or|and/or|"
    r"correlat(?:e|ion) (?:clinically )?for|equivocal|borderline|less likely|obscur(?:e|es|ed|ing)|maybe|"
    r"secondary to)\b"
)
_UNCERTAIN_AFTER = re.compile(
    r"^[\s,]*(?:(?:is|are|was|were)\s+)?(?:also\s+)?(?:possible|possibly|probable|questionable|suspected|suggested|"
    r"(?:may|might|could|can) (?:also )?(?:be|have)|versus|vs\b|or\b|and/or|"
    r"(?:poorly|incompletely|not well|not clearly) (?:evaluated|visualized|assessed|seen)|obscured|less likely|"
    r"not (?:well )?(?:appreciated)|"
    r"(?:difficult|hard) to (?:assess|evaluate|exclude)|(?:top|upper|high)[- ]normal|borderline)\b"
)
# CheXpert: a stable / unchanged heart or mediastinum says nothing certain about its size.
_STABLE_TARGET = re.compile(r"cardiomediastin|mediastin|contour|silhouette|size|heart|shadow|configuration|width")
_STABLE = re.compile(r"\b(?:stable|unchanged|similar|not changed|no change|without change)\b")
_ALWAYS_UNCERTAIN = re.compile(r"congestion|prominence|engorgement|redistribution|indistinct|blunt|borderline")
_CHF = re.compile(r"^(?:congestive )?heart failure$|^chf$")


def _clause(sentence: str, start: int, end: int, cuts: list[re.Match]) -> tuple[str, str]:
    """The text of the mention's clause before and after it."""
    lo, hi = 0, len(sentence)
    for c in cuts:
        if c.end() <= start:  # a word cue ("but") opens the next clause, punctuation is dropped
            lo = c.end() if c.group(0) in ";:." else c.start()
        elif c.start() >= end:
            hi = c.start()
            break
    return sentence[lo:start], sentence[end:hi]


def classify(sentence: str, start: int, end: int, cuts: list[re.Match] | None = None) -> int:
    """Label of the mention sentence[start:end] (see the module doc, stage 2)."""
    cuts = list(_CLAUSE_END.finditer(sentence)) if cuts is None else cuts
    (before, after), text = _clause(sentence, start, end, cuts), sentence[start:end]
    if _PRE_UNCERTAIN_BEFORE.search(before) or _PRE_UNCERTAIN_AFTER.search(after):
        return UNCERTAIN
    if _NEGATION_WIDE.search(before) or _NEGATION_NARROW.search(before) or _NEGATION_AFTER.search(after):
        return NEGATIVE
    if _UNCERTAIN_BEFORE.search(before) or _UNCERTAIN_AFTER.search(after) or _ALWAYS_UNCERTAIN.search(text):
        return UNCERTAIN
    if _STABLE_TARGET.search(text) and (_STABLE.search(before) or _STABLE.search(after)):
        return UNCERTAIN
    return POSITIVE


def _aggregate(found: list[int]) -> int:
    if POSITIVE in found:
        return POSITIVE
    return UNCERTAIN if UNCERTAIN in found else NEGATIVE


def label_report(text: str | None) -> tuple[int | None, ...]:
    """Labels in OBSERVATIONS order: 1 positive, 0 negative, -1 uncertain, None not mentioned."""
    mentions: dict[str, list[int]] = {}
    finding = False
    report = " ".join(str(text or "").lower().split())
    for sentence in _SENTENCE.split(report):
        if not sentence:
            continue
        cuts: list[re.Match] | None = None
        for m in _MENTION.finditer(sentence):
            group = _GROUPS[int(m.lastgroup[1:])]
            if group == "_unmention":
                continue
            if cuts is None:
                cuts = list(_CLAUSE_END.finditer(sentence))
            label = classify(sentence, m.start(), m.end(), cuts)
            if label != NEGATIVE and group != SUPPORT_DEVICES:
                finding = True
                if _CHF.match(m.group(0)):
                    mentions.setdefault("Cardiomegaly", []).append(UNCERTAIN)
            if group != NO_FINDING:
                mentions.setdefault(group, []).append(label)
    labels = {name: _aggregate(found) for name, found in mentions.items()}
    if not finding:
        labels[NO_FINDING] = POSITIVE
    return tuple(labels.get(name) for name in OBSERVATIONS)


def label_reports(texts: Sequence[str | None]) -> list[tuple[int | None, ...]]:
    return [
        label_report(t)
        for t in tqdm(texts, desc="CheXpert labels", unit="report", mininterval=5, disable=len(texts) < 1000)
    ]


def labels_frame(texts: Sequence[str | None], index: Sequence | None = None) -> pd.DataFrame:
    """One row per report, the 14 observation columns as nullable integers (blank = not mentioned)."""
    df = pd.DataFrame(label_reports(texts), columns=list(OBSERVATIONS), index=index)
    return df.astype("Int64")
