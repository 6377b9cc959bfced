"""Real text that ships with Python itself: the corpus ``make profile`` measures quality on,
and the calibration set a model stage seeds its shadow agreement with."""

from __future__ import annotations


def corpus(limit: int = 400) -> list[str]:
    """Paragraphs of Python's own help topics (pydoc_data): real, offline, deterministic."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            text = " ".join(para.split())
            if len(text.split()) >= 25 and text.count(".") >= 2 and not text.startswith(">>>"):
                docs.append(text)
    step = max(1, len(docs) // limit)
    return docs[::step][:limit]


def queries(docs: list[str]) -> list[str]:
    """A known-answer query per document: one of its inner sentences, not its opening."""
    out = []
    for d in docs:
        sentences = [x.strip() for x in d.split(". ") if len(x.split()) >= 5]
        out.append(sentences[len(sentences) // 2] if sentences else d)
    return out
