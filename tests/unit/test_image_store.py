"""The local image store on a real directory, and the image store's config."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from pydantic import ValidationError

from serve_app.image_store import (
    FILES_ROUTE,
    NAME_PATTERN,
    ImageStoreConfig,
    LocalDirectoryStore,
    StoreError,
    StoreFull,
    build_store,
    parse_name,
)
from serve_app.image_store.local import TEMP_MAX_AGE_S, TEMP_PREFIX

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(600)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture()
def store(tmp_path) -> LocalDirectoryStore:
    return LocalDirectoryStore(tmp_path / "images", ttl_s=3600, max_bytes=1 << 20, fsync=False)


def files(store: LocalDirectoryStore) -> list[str]:
    return sorted(os.listdir(store.root))


def test_put_writes_the_bytes_under_an_unguessable_expiring_name(store):
    before = time.time()
    stored = run(store.put(PNG, "png", "http://10.0.0.5:8000/"))
    assert NAME_PATTERN.match(stored.name)
    assert before + 3600 - 1 <= stored.expires_at <= time.time() + 3600
    assert stored.url == f"http://10.0.0.5:8000{FILES_ROUTE}{stored.name}"
    assert files(store) == [stored.name]  # no temporary file left behind
    assert (store.root / stored.name).read_bytes() == PNG
    data, name = run(store.read(stored.name))
    assert data == PNG and name.content_type == "image/png"
    assert store.usage_bytes == len(PNG)


def test_names_are_unique_and_carry_256_random_bits(store):
    names = [s.name for s in run(store.put_all([(PNG, "png")] * 20))]
    assert len(set(names)) == 20
    tokens = {parse_name(n).name.split("-", 1)[1].split(".")[0] for n in names}
    assert len(tokens) == 20 and all(len(t) == 43 for t in tokens)


def test_public_base_url_wins_and_the_handle_api_gets_a_relative_url(tmp_path):
    behind_proxy = LocalDirectoryStore(tmp_path, 60, 1 << 20, public_base_url="https://img.example.com/zimage/")
    stored = run(behind_proxy.put(PNG, "webp", "http://127.0.0.1:8000"))
    assert stored.url == f"https://img.example.com/zimage{FILES_ROUTE}{stored.name}"
    assert stored.name.endswith(".webp")
    plain = LocalDirectoryStore(tmp_path, 60, 1 << 20)
    assert run(plain.put(PNG, "jpeg")).url.startswith(FILES_ROUTE)


@pytest.mark.parametrize("name", [
    "../secret.png", "/etc/passwd", "..", ".", "", "a/b.png", "%2e%2e%2fsecret.png",
    "9999999999-" + "A" * 43 + ".png/../../x", "9999999999-" + "A" * 43 + ".PNG", "9999999999-" + "A" * 42 + ".png",
    "9999999999-" + "A" * 43 + ".png\n", "9999999999-" + "A" * 43 + ".gif", TEMP_PREFIX + "0" * 32,
])
def test_names_that_the_store_could_not_have_made_never_reach_the_filesystem(store, name, monkeypatch):
    opened = []
    monkeypatch.setattr(type(store.root), "read_bytes", lambda self: opened.append(self) or b"")
    assert run(store.read(name)) is None
    assert opened == []


def test_a_valid_name_that_does_not_exist_is_none(store):
    assert run(store.read("9999999999-" + "A" * 43 + ".png")) is None


def test_an_expired_image_is_gone_at_once_and_swept_later(store):
    stored = run(store.put(PNG, "png"))
    keep = run(store.put(PNG, "jpeg"))
    later = stored.expires_at
    assert run(store.read(stored.name, now=later - 1)) is not None
    assert run(store.read(stored.name, now=later)) is None  # expired: a 404 even before the sweep
    store.ttl_s = 7200
    young = run(store.put(PNG, "png"))
    assert run(store.sweep(now=later)) == 2
    assert files(store) == [young.name]
    assert keep.name not in files(store)
    assert store.usage_bytes == len(PNG)


def test_the_sweep_removes_abandoned_temporary_files_only(store):
    old = store.root / f"{TEMP_PREFIX}old"
    fresh = store.root / f"{TEMP_PREFIX}fresh"
    foreign = store.root / "README.txt"
    for path in (old, fresh, foreign):
        path.write_bytes(b"x" * 10)
    stale = time.time() - TEMP_MAX_AGE_S - 5
    os.utime(old, (stale, stale))
    assert run(store.sweep()) == 1
    assert sorted(files(store)) == sorted([fresh.name, foreign.name])


def test_the_quota_refuses_rather_than_dropping_live_images(tmp_path):
    store = LocalDirectoryStore(tmp_path, 3600, max_bytes=2 * len(PNG) + 10, fsync=False)
    first, second = run(store.put(PNG, "png")), run(store.put(PNG, "png"))
    with pytest.raises(StoreFull, match="full"):
        run(store.put(PNG, "png"))
    assert sorted(files(store)) == sorted([first.name, second.name])
    assert StoreFull.code == "image_store_full"


def test_expired_images_make_room_before_the_quota_refuses(tmp_path):
    store = LocalDirectoryStore(tmp_path, 0, max_bytes=len(PNG) + 10, fsync=False)
    expired = run(store.put(PNG, "png"))  # ttl 0: expired as soon as written
    store.ttl_s = 3600
    fresh = run(store.put(PNG, "png"))
    assert files(store) == [fresh.name] and expired.name != fresh.name


def test_put_all_is_all_or_nothing(tmp_path):
    store = LocalDirectoryStore(tmp_path, 3600, max_bytes=len(PNG) + 10, fsync=False)
    with pytest.raises(StoreFull):
        run(store.put_all([(PNG, "png"), (PNG, "png")]))
    assert files(store) == []
    assert store.usage_bytes == 0


def test_a_failed_write_leaves_nothing_behind(store, monkeypatch):
    store.fsync = True

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StoreError, match="No space left"):
        run(store.put(PNG, "png"))
    assert files(store) == []
    assert store.usage_bytes == 0


def test_a_directory_that_went_away_is_a_store_error(tmp_path):
    store = LocalDirectoryStore(tmp_path / "images", 3600, 1 << 20)
    os.rmdir(store.root)
    store.root.write_bytes(b"not a directory")
    with pytest.raises(StoreError, match="cannot write"):
        run(store.put(PNG, "png"))
    with pytest.raises(StoreError):
        run(store.sweep())


def test_build_store_defaults_to_a_directory_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIMAGE_CACHE_DIR", str(tmp_path))
    store = build_store(ImageStoreConfig())
    assert isinstance(store, LocalDirectoryStore)
    assert store.root == (tmp_path / "images").resolve() and store.root.is_dir()
    assert store.ttl_s == 3600 and store.max_bytes == 2 << 30


# ---- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config,message", [
    ({"kind": "s3"}, "needs image_store.s3.bucket"),
    ({"kind": "s3", "s3": {"bucket": "b"}}, "bucket must be"),
    ({"kind": "s3", "s3": {"bucket": "images", "secret_access_key": "x"}}, "credentials never go in args"),
    ({"kind": "s3", "s3": {"bucket": "images", "aws_access_key_id": "x"}}, "credentials never go in args"),
    ({"kind": "s3", "s3": {"bucket": "images", "endpoint_url": "http://key:secret@minio:9000"}}, "user or password"),
    ({"kind": "s3", "s3": {"bucket": "images", "endpoint_url": "minio:9000"}}, "http"),
    ({"kind": "s3", "s3": {"bucket": "images", "prefix": "a/../b"}}, "prefix"),
    ({"url_ttl_s": 8 * 24 * 3600}, "url_ttl_s"),
    ({"public_base_url": "ftp://x"}, "public_base_url"),
    ({"max_bytes": 10}, "max_bytes"),
    ({"kind": "nfs"}, "kind"),
])
def test_bad_config_is_refused_with_a_message(config, message):
    with pytest.raises(ValidationError, match=message) as info:
        ImageStoreConfig.model_validate(config)
    assert "secret" not in str(info.value).replace("secret_access_key", "").replace("SECRET", "")


def test_config_accepts_a_bucket_and_normalises_urls():
    config = ImageStoreConfig.model_validate({
        "kind": "s3", "url_ttl_s": 900, "public_base_url": "https://api.example.com/",
        "s3": {"bucket": "zimage-images", "endpoint_url": "https://minio.internal:9000/", "prefix": "/prod/img/"},
    })
    assert config.s3.endpoint_url == "https://minio.internal:9000"
    assert config.s3.prefix == "prod/img"
    assert config.public_base_url == "https://api.example.com"
    assert config.serves_every_replica
    assert not ImageStoreConfig().serves_every_replica
    assert ImageStoreConfig(shared_directory=True).serves_every_replica


def test_concurrent_writers_never_overshoot_the_quota(tmp_path):
    store = LocalDirectoryStore(tmp_path, 3600, max_bytes=3 * len(PNG) + 10, fsync=False)

    async def many():
        return await asyncio.gather(*(store.put(PNG, "png") for _ in range(8)), return_exceptions=True)

    results = run(many())
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert all(isinstance(r, StoreFull) for r in results if isinstance(r, BaseException))
    assert len(files(store)) == 3


@pytest.mark.parametrize("config,replicas,autoscaling,refused", [
    ({}, None, None, False),
    ({}, 1, None, False),
    ({}, 2, None, True),
    ({}, None, {"min_replicas": 1, "max_replicas": 4}, True),
    ({}, None, {"min_replicas": 1, "max_replicas": 1}, False),
    ({}, "auto", None, True),
    ({"shared_directory": True, "directory": "/mnt/shared/images"}, 4, None, False),
    ({"kind": "s3", "s3": {"bucket": "images"}}, None, {"max_replicas": 8}, False),
])
def test_more_than_one_ingress_needs_a_store_every_replica_serves(config, replicas, autoscaling, refused):
    from serve_app.image_store.config import ingress_replicas_problem

    problem = ingress_replicas_problem(ImageStoreConfig.model_validate(config), replicas, autoscaling)
    assert (problem is not None) == refused
    if refused:
        assert "shared_directory" in problem and "'s3'" in problem


def test_by_reference_swaps_bytes_for_urls_and_stream_events_carry_the_url(store):
    from serve_app.image_store.results import by_reference
    from serve_app.protocol import GeneratedImage, ImageOptions, ImageResult, Timings
    from serve_app.streaming import StreamEvents

    timings = Timings(total_ms=1, style_ms=0, encode_ms=0, denoise_ms=0, decode_ms=0, output_encode_ms=0)
    image = GeneratedImage(data=PNG, format="png", seed=3, width=512, height=512, revised_prompt="p")
    result = run(by_reference(ImageResult([image, image], timings), store, "http://h:1"))
    assert [i.data for i in result.images] == [b"", b""]
    assert all(i.url.startswith(f"http://h:1{FILES_ROUTE}") for i in result.images)
    assert sorted(files(store)) == sorted(i.url.rsplit("/", 1)[1] for i in result.images)

    class Plan:
        width = height = 512
        output_format = "png"
        init_image = None

    events = StreamEvents("image_generation", ImageOptions(prompt="p"), Plan())
    text = events.encode(ImageResult([result.images[0]], timings)).decode()
    assert f'"url":"{result.images[0].url}"' in text and "b64_json" not in text
    plain = events.encode(ImageResult([image], timings)).decode()
    assert '"b64_json":"' in plain and '"url"' not in plain


def test_build_app_refuses_a_local_store_behind_several_ingress_replicas(cache_dir, tiny_source):
    from serve_app.builder import build_app

    base = {"model": "tiny", "device": "cpu", "cache_dir": str(cache_dir)}
    with pytest.raises(ValidationError, match="would not be found on another") as info:
        build_app({**base, "ingress.autoscaling_config": {"min_replicas": 1, "max_replicas": 3}})
    assert "shared_directory" in str(info.value)
    with pytest.raises(ValidationError, match="may run 2 replicas"):
        build_app({**base, "ingress": {"num_replicas": 2}})
    for store in ({"kind": "s3", "s3": {"bucket": "images"}},
                  {"directory": str(cache_dir / "shared-images"), "shared_directory": True}):
        app = build_app({**base, "ingress": {"num_replicas": 2}, "image_store": store})
        assert app is not None
