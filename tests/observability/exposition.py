"""Reading a ``/metrics`` answer: samples by name and labels, and sums over label subsets."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class Exposition:
    """The samples of one scrape: ``value(name, **labels)`` sums every sample of ``name`` whose
    labels include ``labels`` (0 when none matches)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        self.names: set[str] = set()  # every series name the text declares, samples or not
        for family in text_string_to_metric_families(text):
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
            self.names.update(family.name + suffix for suffix in suffixes)
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def value(self, name: str, **labels: str) -> float:
        return sum(v for n, ls, v in self.samples if n == name and all(ls.get(k) == w for k, w in labels.items()))

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and all(ls.get(k) == w for k, w in labels.items()) for n, ls, _ in self.samples)

    def label_values(self, name: str, label: str) -> set[str]:
        return {ls[label] for n, ls, _ in self.samples if n == name and label in ls}


def delta(before: Exposition, after: Exposition, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)
