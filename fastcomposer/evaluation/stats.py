"""How sure a difference between two variants is: the paired t interval over prompt x seed pairs.

Both variants ran the same prompts with the same seeds, so each pair's difference removes what the prompt and the
seed contribute, and the interval is much tighter than comparing two means. With d_1..d_n the differences, the
95% interval is mean(d) +- t(0.975, n - 1) * sd(d) / sqrt(n), sd with n - 1 in the denominator (scipy's Student t).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> dict:
    """{"mean", "low", "high", "pairs"} for the mean of paired differences; low/high None with fewer than 2 pairs."""
    from scipy.stats import t

    n = len(differences)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "pairs": 0}
    mean = sum(differences) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "pairs": 1}
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "pairs": n}


def paired_differences(entries: list[dict], variant: str, baseline: str, key: str) -> list[float]:
    """Per (case, prompt, alpha, seed) that both variants scored: variant's mean `key` minus baseline's."""
    means: dict[tuple, dict[str, list[float]]] = {}
    for e in entries:
        if e["hidden"] or e.get(key) is None:
            continue
        pair = (e["case"], e["prompt_index"], e["alpha"], e["seed"])
        means.setdefault(pair, {}).setdefault(e["variant"], []).append(float(e[key]))
    return [sum(v[variant]) / len(v[variant]) - sum(v[baseline]) / len(v[baseline])
            for v in means.values() if variant in v and baseline in v]
