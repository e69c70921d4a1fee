"""Image store speed: obstore (what the S3 store uses) against boto3, and the local directory store,
on one machine in one run, against a real S3-compatible server process (moto's, on 127.0.0.1).

    PYTHONPATH=$PWD python benchmarks/bench_image_store.py [--mb 1.5] [--repeats 30]

Prints each library's import and client-setup time (fresh interpreters), the median put of one
image, the median presign, and 8 images put concurrently (obstore's async calls; boto3 on 8 threads,
as an asyncio server would have to run it). s3fs is not measured: it reaches S3 through aiobotocore,
which pins its own botocore (a downgrade of boto3's here), and signs through botocore as boto3 does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from tests.s3_server import credentials_in_environment, s3_server

BUCKET = "zimage-bench"


def fresh_import_ms(statement: str, repeats: int = 3) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print((time.perf_counter() - t) * 1000)"
    runs = [float(subprocess.check_output([sys.executable, "-c", code], env=os.environ).decode())
            for _ in range(repeats)]
    return statistics.median(runs)


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.5, help="image size in MB (a 1024x1024 PNG is 1-3 MB)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    data = os.urandom(int(args.mb * 1e6))

    import boto3
    import obstore
    from obstore.store import S3Store

    from serve_app.image_store import LocalDirectoryStore

    rows: list[tuple[str, str, str]] = []
    with s3_server() as server, credentials_in_environment():
        server.create_bucket(BUCKET)
        rows.append(("import (ms)", f"{fresh_import_ms('import obstore.store'):.1f}",
                     f"{fresh_import_ms('import boto3'):.1f}"))
        setup_o = ("import obstore.store as s; s.S3Store('b', endpoint='http://127.0.0.1:1', "
                   "client_options={'allow_http': True})")
        setup_b = "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:1')"
        rows.append(("import + client (ms)", f"{fresh_import_ms(setup_o):.1f}", f"{fresh_import_ms(setup_b):.1f}"))

        store = S3Store(BUCKET, prefix="o", endpoint=server.endpoint_url, client_options={"allow_http": True})
        client = boto3.client("s3", endpoint_url=server.endpoint_url)
        counter = iter(range(10**9))

        def o_put():
            obstore.put(store, f"{next(counter)}.png", data, attributes={"Content-Type": "image/png"},
                        use_multipart=False)

        def b_put():
            client.put_object(Bucket=BUCKET, Key=f"b/{next(counter)}.png", Body=data, ContentType="image/png")

        rows.append((f"put {args.mb:g} MB (ms, median)", f"{median_ms(o_put, args.repeats):.1f}",
                     f"{median_ms(b_put, args.repeats):.1f}"))
        o_sign = lambda: obstore.sign(store, "GET", "0.png", timedelta(hours=1))  # noqa: E731
        b_sign = lambda: client.generate_presigned_url(  # noqa: E731
            "get_object", Params={"Bucket": BUCKET, "Key": "b/0.png"}, ExpiresIn=3600)
        rows.append(("presign GET (us, median)", f"{median_ms(o_sign, 500) * 1000:.0f}",
                     f"{median_ms(b_sign, 500) * 1000:.0f}"))

        async def o_eight():
            await asyncio.gather(*(obstore.put_async(store, f"{next(counter)}.png", data, use_multipart=False)
                                   for _ in range(8)))

        pool = ThreadPoolExecutor(8)

        def b_eight():
            list(pool.map(lambda _: b_put(), range(8)))

        rows.append(("8 puts at once (ms, median)", f"{median_ms(lambda: asyncio.run(o_eight()), 10):.1f}",
                     f"{median_ms(b_eight, 10):.1f}"))
        pool.shutdown()

    with tempfile.TemporaryDirectory() as directory:
        local = LocalDirectoryStore(directory, 3600, 1 << 34)
        local_ms = median_ms(lambda: asyncio.run(local.put(data, "png")), args.repeats)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"image store bench, {stamp}, {os.cpu_count()} CPUs, moto S3 server on 127.0.0.1, "
          f"obstore {obstore.__version__}, boto3 {boto3.__version__}")
    print(f"| {'':28} | {'obstore':>9} | {'boto3':>9} |")
    print(f"| {'-' * 28} | {'-' * 9}:| {'-' * 9}:|")
    for name, o, b in rows:
        print(f"| {name:28} | {o:>9} | {b:>9} |")
    print(f"local directory store put {args.mb:g} MB (temp file, fsync, rename): {local_ms:.1f} ms median")


if __name__ == "__main__":
    main()
