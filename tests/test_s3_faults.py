"""S3 fault injection (issue 26 item 5): ingest, training and batch inference through a fault proxy in front of the
local S3 server (tests/s3_faults.py: ``503 SlowDown`` to ~10 % of requests, ~1 % of response bodies cut mid-way;
every stage meets both faults with both client libraries) complete, and their outputs equal a fault-free run's:

- ingest (threads engine, real CBSD68 + CelebA-HQ photos from an ``s3://`` prefix, NVIDIA masks from an
  ``s3://...zip``) writes image shards byte for byte equal to the session's fault-free ``prepared_shards`` (same
  photos and options, local), and mask rows equal to its rows (all but ``source``, which names the source);

Each test prints the proxy's counts of its stage (requests, 503s sent, bodies cut, failed requests sent again).
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import pytest

from pconv import ingest
from pconv.storage import shards, uris
from s3_faults import S3FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.integration]
log = logging.getLogger(__name__)

SEED = 26  # the proxy's: which requests fail
COUNTED = ("requests", "slowdown", "dropped", "retried")


@pytest.fixture(scope="module")
def proxy(s3_server):
    with S3FaultProxy(s3_server.env, slowdown_rate=0.10, drop_rate=0.01, seed=SEED) as p:
        yield p


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.create_bucket(f"faults-{uuid.uuid4().hex[:10]}")


def _report(proxy: S3FaultProxy, stage: str, seconds: float, record_property) -> dict[str, int]:
    """The stage's counts (printed for the closing note and recorded in the junit XML); asserts it met faults of
    both kinds, and that every failed request was sent again."""
    counts = proxy.counts.get(stage, {})
    summary = {k: counts.get(k, 0) for k in COUNTED}
    summary.update({k: v for k, v in sorted(counts.items()) if "." in k and not k.startswith("bytes")})
    print(f"\nS3 faults, {stage} ({seconds:.1f} s): {json.dumps(summary)}")
    record_property(f"s3_faults_{stage}", json.dumps(summary))
    assert summary["slowdown"] > 0 and summary["dropped"] > 0, summary
    assert summary["retried"] == summary["slowdown"] + summary["dropped"], summary
    return summary


# ---------------------------------------------------------------------------------------------
# One GET whose body breaks off (pconv.storage.uris.read_bytes: botocore does not retry it)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuts", [uris.BODY_READ_ATTEMPTS - 1, uris.BODY_READ_ATTEMPTS])
def test_a_get_whose_body_breaks_off_is_sent_again_up_to_the_bound(s3_server, bucket, cuts, caplog):
    from botocore.exceptions import ResponseStreamingError

    data = bytes(range(256)) * 800
    uri = f"{bucket}/cut/blob.bin"
    uris.write_bytes_atomic(uri, data)  # directly, not through the proxy
    with S3FaultProxy(s3_server.env, slowdown_rate=0.0, drop_rate=1.0, max_in_a_row=cuts, first_faults=False) as p, \
            p.environment():
        if cuts < uris.BODY_READ_ATTEMPTS:
            assert uris.read_bytes(uri) == data
        else:
            with pytest.raises(ResponseStreamingError):
                uris.read_bytes(uri)
    gets = [r.outcome for r in p.requests("-") if r.method == "GET"]
    assert gets == ["dropped"] * cuts + (["200"] if cuts < uris.BODY_READ_ATTEMPTS else [])
    assert caplog.text.count("the response body broke off") == min(cuts, uris.BODY_READ_ATTEMPTS - 1)


# ---------------------------------------------------------------------------------------------
# Ingest
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faulted_shards(proxy, bucket, photo_dir, mask_zip, prepared_shards) -> dict:
    """The photos and the mask zip put on S3 directly, then ingested from there to S3 through the proxy with
    ``prepared_shards``' options."""
    uris.upload_dir(str(photo_dir), f"{bucket}/raw/photos")
    uris.write_bytes_atomic(f"{bucket}/raw/masks.zip", mask_zip.read_bytes())
    out = {"images": f"{bucket}/images", "masks": f"{bucket}/masks", "sources": {}}
    start = time.monotonic()
    with proxy.environment(), proxy.stage("ingest"):
        ingest.ingest_images(f"{bucket}/raw/photos", out["images"], val_fraction=0.25, shard_size_mb=1.0,
                             engine="threads", progress=False)
        ingest.ingest_masks(f"{bucket}/raw/masks.zip", out["masks"], hole_color="white", engine="threads",
                            progress=False)
    out["seconds"] = time.monotonic() - start
    return out


def _same_manifest(a: dict, b: dict, same_bytes: bool = True) -> None:
    """The same manifest but for where the data came from and the run's id and time; with ``same_bytes``, the same
    shard sizes too (mask rows name their source, so mask shards from another source differ in size)."""
    sizes = ("bytes",) if same_bytes else ()
    fields = ("schema_version", "kind", "counts", "columns", "skipped_count", "skipped", "options", "bins",
              "out_of_bins", *(("total_bytes",) if same_bytes else ()))
    for field in fields:
        assert a.get(field) == b.get(field), field
    assert [[s[k] for k in ("split", "rows", "row_groups", *sizes)] for s in a["shards"]] == \
        [[s[k] for k in ("split", "rows", "row_groups", *sizes)] for s in b["shards"]]


def test_ingest_through_faults_writes_the_fault_free_shards(faulted_shards, prepared_shards, proxy, bucket,
                                                            record_property):
    images = shards.read_manifest(faulted_shards["images"])
    twin_images = shards.read_manifest(prepared_shards["images"])
    _same_manifest(images, twin_images)
    assert images["counts"]["train"] > 0 and images["counts"]["val"] > 0
    for a, b in zip(images["shards"], twin_images["shards"]):  # byte for byte (names carry each run's id)
        assert uris.read_bytes(uris.join(faulted_shards["images"], a["path"])) == \
            uris.read_bytes(uris.join(prepared_shards["images"], b["path"])), a["path"]

    masks, twin_masks = shards.read_manifest(faulted_shards["masks"]), shards.read_manifest(prepared_shards["masks"])
    _same_manifest(masks, twin_masks, same_bytes=False)
    columns = [c for c in shards.MASK_SCHEMA.names if c != "source"]
    for split in shards.SPLITS:
        got = shards.read_table(shards.shard_uris(faulted_shards["masks"], split=split), shards.MASK_SCHEMA.names)
        want = shards.read_table(shards.shard_uris(prepared_shards["masks"], split=split), columns)
        assert got.select(columns).equals(want), split
        assert set(got.column("source").to_pylist()) <= {f"{bucket}/raw/masks.zip"}

    requests = proxy.requests("ingest")
    assert {r.client for r in requests} == {"botocore", "pyarrow"}  # prefix + shards by boto3, the zip by pyarrow
    assert any(r.method == "PUT" and r.target.endswith(".parquet") for r in requests)
    _report(proxy, "ingest", faulted_shards["seconds"], record_property)

