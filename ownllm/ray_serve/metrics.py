"""The ingress's /metrics: every replica's Prometheus metrics (server/metrics.py) in one exposition, each sample
labelled with the replica it came from (replica="..."), plus ownllm_replicas, the replicas that answered.
Sums across replicas are left to the scraper (sum without (replica) ...). Plain text in, text out: no Ray here.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


def aggregate(expositions: Iterable[tuple[str, bytes]]) -> tuple[bytes, str]:
    """(replica id, its exposition text) for each replica -> (one exposition, its content type)."""
    families: dict[str, Metric] = {}
    num_replicas = 0
    for replica, text in expositions:
        num_replicas += 1
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples.extend(Sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp,
                                         s.exemplar) for s in family.samples)
    replicas = GaugeMetricFamily("ownllm_replicas", "Replicas that answered this scrape.", value=num_replicas)
    registry = CollectorRegistry()
    registry.register(_Fixed([replicas, *families.values()]))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
