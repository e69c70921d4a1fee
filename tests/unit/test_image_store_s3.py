"""The S3 image store against a real S3-compatible server process (moto's standalone server on
127.0.0.1, started here and killed afterwards); credentials only through the environment."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from serve_app.image_store import ImageStoreConfig, StoreError, build_store, parse_name
from serve_app.image_store.s3 import S3ImageStore
from tests.s3_server import credentials_in_environment, free_port, s3_server

BUCKET = "zimage-unit"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def server():
    with s3_server() as srv, credentials_in_environment():
        srv.create_bucket(BUCKET)
        yield srv


def make_store(server, prefix: str = "unit/images", ttl_s: int = 3600, **kwargs) -> S3ImageStore:
    config = ImageStoreConfig.model_validate({"kind": "s3", "url_ttl_s": ttl_s, "s3": {
        "bucket": BUCKET, "endpoint_url": server.endpoint_url, "prefix": prefix, "timeout_s": 5, **kwargs}})
    store = build_store(config)
    assert isinstance(store, S3ImageStore)
    return store


def test_put_and_fetch_through_the_presigned_url(server):
    store = make_store(server, ttl_s=900)
    stored = run(store.put(PNG, "png"))
    url = urlsplit(stored.url)
    assert f"{url.scheme}://{url.netloc}" == server.endpoint_url
    assert url.path == f"/{BUCKET}/unit/images/{stored.name}"
    query = parse_qs(url.query)
    assert query["X-Amz-Expires"] == ["900"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"][0].startswith("testing/")  # the key id from the environment
    response = httpx.get(stored.url, timeout=10)
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


def test_the_url_carries_a_signature_never_the_secret(server):
    store = make_store(server)
    first, second = run(store.put(PNG, "jpeg")), run(store.put(PNG, "jpeg"))
    assert "testing-secret" not in first.url
    signatures = {parse_qs(urlsplit(s.url).query)["X-Amz-Signature"][0] for s in (first, second)}
    assert len(signatures) == 2 and all(len(sig) == 64 for sig in signatures)


def test_public_endpoint_signs_for_the_address_clients_reach(server):
    store = make_store(server, public_endpoint_url="https://images.example.com")
    stored = run(store.put(PNG, "webp"))
    assert stored.url.startswith(f"https://images.example.com/{BUCKET}/unit/images/{stored.name}?")
    assert run(store.read(stored.name)) == PNG  # written through the internal endpoint


def test_sweep_deletes_expired_images_under_the_prefix_only(server):
    store = make_store(server, prefix="sweep")
    neighbour = make_store(server, prefix="elsewhere")
    keep = run(store.put(PNG, "png"))
    store.ttl_s = 0
    gone = [run(store.put(PNG, "png")) for _ in range(3)]
    other = run(neighbour.put(b"x", "png"))
    store.ttl_s = 0
    assert run(store.sweep()) == 3
    assert all(run(store.read(g.name)) is None for g in gone)
    assert run(store.read(keep.name)) == PNG
    assert run(neighbour.read(other.name)) == b"x"
    assert parse_name(keep.name) is not None


def test_put_all_removes_what_it_wrote_when_one_fails(server, monkeypatch):
    store = make_store(server, prefix="all-or-nothing")
    real_put = S3ImageStore.put
    calls = []

    async def second_fails(self, data, fmt, base=None):
        calls.append(fmt)
        if len(calls) == 2:
            await asyncio.sleep(0.2)  # the first write has landed by then
            raise StoreError("the bucket refused the second image")
        return await real_put(self, data, fmt, base)

    monkeypatch.setattr(S3ImageStore, "put", second_fails)
    with pytest.raises(StoreError, match="second image"):
        run(store.put_all([(PNG, "png"), (PNG, "png")]))
    monkeypatch.setattr(S3ImageStore, "put", real_put)
    assert run(store.sweep(now=2**40)) == 0  # nothing left under the prefix, even counting far in the future


def test_a_missing_bucket_is_a_store_error_that_names_it(server):
    config = ImageStoreConfig.model_validate({"kind": "s3", "s3": {
        "bucket": "no-such-bucket", "endpoint_url": server.endpoint_url, "timeout_s": 5}})
    with pytest.raises(StoreError, match="no-such-bucket") as info:
        run(build_store(config).put(PNG, "png"))
    assert "testing-secret" not in str(info.value)


def test_an_unreachable_server_fails_within_the_timeout():
    import time

    with credentials_in_environment():
        config = ImageStoreConfig.model_validate({"kind": "s3", "s3": {
            "bucket": "images", "endpoint_url": f"http://127.0.0.1:{free_port()}", "timeout_s": 2}})
        start = time.monotonic()
        with pytest.raises(StoreError, match="images"):
            run(build_store(config).put(PNG, "png"))
    assert time.monotonic() - start < 10
