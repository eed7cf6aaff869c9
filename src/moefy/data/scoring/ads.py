"""A heuristic advertisement / boilerplate score in [0, 1) that needs no labels: link, phone, price and
call-to-action rates per 100 words, plus boilerplate density (short lines) and repetition (repeated lines and
word 3-grams). The weights are plain, documented numbers; train a classifier when labels exist."""

from __future__ import annotations

import math
import re

URL = re.compile(r"https?://\S+|www\.\S+|\b\S+\.(?:com|net|org|shop|store|biz)\b", re.I)
PHONE = re.compile(r"(?:\+?\d[\s.-]?)?(?:\(\d{3}\)|\d{3})[\s.-]\d{3}[\s.-]\d{4}\b")
PRICE = re.compile(r"[$€£]\s?\d+(?:[.,]\d+)?|\b\d+(?:[.,]\d+)?\s?(?:usd|eur|dollars)\b|\b\d{1,2}\s?% off\b", re.I)
CTA = re.compile(r"\b(?:buy now|order now|shop now|click here|call now|sign up|subscribe|limited time|free shipping|"
                 r"best price|discount|coupon|promo code|deal|sale|act now|don't miss|add to cart)\b", re.I)
WEIGHTS = {"url": 0.4, "phone": 0.6, "price": 0.4, "cta": 0.5, "short_lines": 0.5, "repetition": 1.5}


def ad_features(text: str) -> dict[str, float]:
    words = text.split()
    per100 = 100.0 / max(len(words), 1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return {
        "url": len(URL.findall(text)) * per100,
        "phone": len(PHONE.findall(text)) * per100,
        "price": len(PRICE.findall(text)) * per100,
        "cta": len(CTA.findall(text)) * per100,
        "short_lines": sum(len(line.split()) < 4 for line in lines) / len(lines) if len(lines) > 3 else 0.0,
        "repetition": (1 - len(set(lines)) / len(lines) if len(lines) > 1 else 0.0)
        + (1 - len(set(trigrams)) / len(trigrams) if len(trigrams) > 10 else 0.0),
    }


def ad_score(text: str) -> float:
    raw = sum(WEIGHTS[k] * v for k, v in ad_features(text).items())
    return 1 - math.exp(-raw)
