"""The ingest metrics are declared once, in the platform registry."""

from raymoe.monitor import metrics as M


def test_ingest_metrics_registered_with_unique_names():
    names = [m.name for m in M.REGISTRY]
    assert len(names) == len(set(names))
    ingest = [
        M.INGEST_RECORDS,
        M.INGEST_BYTES,
        M.INGEST_TOKENS,
        M.INGEST_QUARANTINED,
        M.INGEST_FILTERED,
        M.INGEST_DUPLICATES,
    ]
    assert all(m in M.REGISTRY for m in ingest)
    assert all(m.name.startswith("raymoe_ingest_") and m.kind == "counter" for m in ingest)
    assert M.INGEST_QUARANTINED.tag_keys == ("reason",)
    assert M.INGEST_RECORDS.tag_keys == ("source",)


def test_prometheus_names_follow_ray_export():
    # As scraped from a Ray 2.60 metrics port during an ingest run.
    assert M.prometheus_name(M.INGEST_RECORDS) == "ray_raymoe_ingest_records_total"
