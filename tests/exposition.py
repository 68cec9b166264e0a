"""Reading the daemon's Prometheus text exposition back into samples."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

#: Sample name -> (labels, value) of each sample of that name, in the text's order.
Series = dict[str, list[tuple[dict[str, str], float]]]


def series(text: bytes) -> Series:
    """Every sample in ``text`` (parsed by prometheus_client, which refuses malformed text)."""
    found: Series = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found
