"""One real Ray instance and one Serve application (tiny model, CPU) shared by the integration tests.

Real parts only: Ray Serve, HTTP on 127.0.0.1, the official openai client. The app is deployed once;
tests that need other settings change its live `user_config`, as an operator would.

A few tests need other `args` (a ControlNet, an S3 image store, API keys). Each change of args restarts all
five stages (Serve hashes args into the code version: most of a minute on a 2-core machine), so those tests
run last, in the order of `OTHER_ARGS`, one change going straight to the next; the session's args are
deployed again only before a test that needs them (`session_args`), not after each module.
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import glob
import io
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import httpx
import pytest
from PIL import Image

APP_NAME = "zimage"
TEST_BATCH_WAIT_S = 0.1  # a little company for concurrent test requests on a slow CPU


# The fixtures that deploy the shared app with other args than the session's, in the order their tests run:
# after every other integration test (tests/integration/test_controlnet.py, then test_image_urls.py). The
# last two deploy the same args (`last_args`).
# (test_reliability.py's keys test changes the args and deploys the session's again itself, under load, as
# part of what it tests: it keeps its place among the tests on the session's args.)
OTHER_ARGS = ("controlled", "control_only", "s3_app")


def _run_order(item) -> int:
    """0: tests without the shared app (before it starts); 1: on the session's args; then each of
    OTHER_ARGS."""
    names = getattr(item, "fixturenames", ())
    if "served" not in names:
        return 0
    for rank, fixture in enumerate(OTHER_ARGS):
        if fixture in names:
            return 2 + rank
    return 1


def pytest_collection_modifyitems(session, config, items):
    """Orders the integration tests by `_run_order` (a stable sort: within a rank, as collected); the
    other tests keep their places. Only this package's items move, within the places they held."""
    here = os.path.dirname(os.path.abspath(__file__))
    places = [i for i, item in enumerate(items) if str(item.path).startswith(here + os.sep)]
    ordered = sorted((items[i] for i in places), key=_run_order)
    for place, item in zip(places, ordered):
        items[place] = item


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_args(cache_dir) -> dict:
    knobs = {"max_batch_size": 8, "batch_wait_timeout_s": TEST_BATCH_WAIT_S}
    return {
        "model": "tiny",
        "device": "cpu",
        "cache_dir": str(cache_dir),
        "text_encoder": {"user_config": knobs},
        "vae": {"user_config": knobs},
        "denoiser": {"user_config": knobs},
        "api": {"max_images_per_request": 4, "max_upload_bytes": 2 << 20, "max_body_bytes": 64 << 10},
    }


def off_loop(call):
    """`call()` on a thread of its own: a handle's blocking `.result()` refuses to run where an event
    loop is running, as under Playwright's sync API."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result()


@dataclass
class ServedApp:
    url: str
    args: dict
    port: int
    metrics_port: int
    last_check: object = None  # what the last readiness check of a deploy saw
    # What the app runs now: {"args": ..., "deployments": ...} of the last deploy that finished (empty while
    # one is under way or failed). Shared by the copies `dataclasses.replace` makes (one app, one state).
    deployed: dict = field(default_factory=dict)

    def deploy(self, deployments: list[dict] | None = None, timeout_s: float = 300, route_prefix: str = "/") -> None:
        """Deploys from a config, as `serve deploy` does. `deployments` overrides per-deployment options;
        when only their `user_config` changes, replicas are reconfigured in place, not restarted. Another
        `route_prefix` moves the app there without a restart; such a deploy is not recorded in `deployed`,
        so the next test on the shared app deploys it at / again (`session_args`)."""
        from ray import serve
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        config = {
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "applications": [
                {"name": APP_NAME, "route_prefix": route_prefix, "import_path": "serve_app:build_app",
                 "args": self.args, "deployments": deployments or []}
            ],
        }
        self.deployed.clear()
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if (status is not None and status.status == "RUNNING" and self._denoiser_config_applied(deployments or [])
                    and self._routed(route_prefix)):
                if route_prefix == "/":
                    self.deployed.update(args=copy.deepcopy(self.args), deployments=copy.deepcopy(deployments or []))
                return
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"deploy failed: {status.message}")
            time.sleep(0.5)
        details = {name: (d.status, d.message) for name, d in status.deployments.items()} if status else None
        raise TimeoutError(f"{APP_NAME} not running after {timeout_s}s: {details}; last Denoiser check: "
                           f"{self.last_check}")

    def use(self, args: dict | None = None, deployments: list[dict] | None = None) -> "ServedApp":
        """The shared app running `args` (this app's own by default) with `deployments`' overrides (none by
        default): deployed only when it runs something else now. Returns a ServedApp for those args."""
        app = self if args is None else replace(self, args=args)
        if self.deployed != {"args": app.args, "deployments": deployments or []}:
            app.deploy(deployments)
        return app

    def _denoiser_config_applied(self, deployments: list[dict]) -> bool:
        """RUNNING can still describe the previous config for a moment after a redeploy; what the last
        check saw is kept for the timeout's message."""
        wanted = self.args["denoiser"]["user_config"]
        for item in deployments:
            if item["name"] == "Denoiser":
                wanted = item.get("user_config", wanted)
        try:
            config = self.stats("Denoiser")["config"]
        except Exception as exc:
            self.last_check = repr(exc)
            return False
        self.last_check = config
        return all(config.get(k) == v for k, v in wanted.items())

    def _routed(self, route_prefix: str) -> bool:
        """Whether Serve's proxy sends `route_prefix` to the app yet: it learns a new prefix a moment
        after the app is RUNNING."""
        try:
            return httpx.get(self.url + route_prefix.rstrip("/") + "/health/live", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stats(self, deployment: str) -> dict:
        from ray import serve

        return off_loop(lambda: serve.get_deployment_handle(deployment, APP_NAME).stats.remote().result(timeout_s=30))

    @staticmethod
    def logs_dir() -> str:
        """This Ray session's log folder (Serve's replica logs are under serve/)."""
        import ray

        return ray._private.worker.global_worker.node.get_logs_dir_path()

    def access_lines(self, request_id: str, timeout_s: float = 30) -> list[str]:
        """The Ingress's access-log lines of one request (written when its response, or stream, ends)."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [line for path in glob.glob(f"{self.logs_dir()}/serve/replica_{APP_NAME}_Ingress_*.log")
                     for line in open(path, errors="replace") if f" {request_id} " in line and " access " in line]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.5)

    def reset_stats(self) -> None:
        from ray import serve

        for name in ("TextEncoder", "Denoiser", "VaeDecoder"):
            off_loop(lambda: serve.get_deployment_handle(name, APP_NAME).reset_stats.remote().result(timeout_s=30))


@pytest.fixture(scope="package")
def served(cache_dir, tiny_source) -> Iterator[ServedApp]:
    """The shared app, for this package's tests only: it stops after the last of them, so that it idles
    beside no other test (tests/unit run after this package)."""
    import ray
    from ray import serve

    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # the metrics agent exports each second
    metrics_port = free_port()
    # A Ray instance of its own whatever else runs on the machine (a `serve run` of the quick start, another
    # test session): address "local" starts one rather than joining the one RAY_ADDRESS or Ray's address
    # file names; the GCS takes a port the system gives, the dashboard is off, each port these tests use is
    # picked free, and its session folder is its own (/tmp/ray/session_latest stays the other instance's).
    ray_tmp = tempfile.mkdtemp(prefix="zr", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        ray.init(address="local", num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 _metrics_export_port=metrics_port, _temp_dir=ray_tmp)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = ServedApp(url=f"http://127.0.0.1:{port}", args=base_args(cache_dir), port=port,
                        metrics_port=metrics_port)
        app.deploy()
        yield app
    finally:
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)  # also when Ray did not start


@pytest.fixture(autouse=True)
def session_args(request) -> None:
    """A test on the shared app that does not ask for other args (OTHER_ARGS) gets the session's: deployed
    again here (a restart of every stage) if a test before left the app on others (see `_run_order`).
    Live `user_config` overrides are left to the tests that make them (a module's fixture may keep one)."""
    names = request.fixturenames
    if "served" in names and not any(fixture in names for fixture in OTHER_ARGS):
        app = request.getfixturevalue("served")
        if app.deployed.get("args") != app.args:
            app.deploy()


S3_BUCKET, S3_PREFIX = "zimage-integration", "served/images"


@pytest.fixture(scope="package")
def last_args(served, cache_dir) -> Iterator[tuple[dict, list[dict], object]]:
    """(args, deployments, S3 server): the app's last args of the session, shared by two modules' tests
    because each change of args restarts every stage. A ControlNet of Union 1.0's layout (16 control
    channels, no mask: test_controlnet.py's `control_only`) and an S3 image store on moto's server
    (test_image_urls.py's `s3_app`), whose credentials reach the Ingress replica through its environment
    only (runtime_env), never through args. Neither module's tests use what the other's part sets (no
    control in the S3 tests, no `url` response format in the ControlNet's)."""
    from deployments.weights.controlnet_source import ensure_tiny_controlnet
    from tests.s3_server import TEST_CREDENTIALS, s3_server

    with s3_server() as server:
        server.create_bucket(S3_BUCKET)
        args = {**served.args, "controlnet": str(ensure_tiny_controlnet(cache_dir, mask_channels=False)),
                "image_store": {"kind": "s3", "url_ttl_s": 600, "s3": {
                    "bucket": S3_BUCKET, "endpoint_url": server.endpoint_url, "prefix": S3_PREFIX, "timeout_s": 5}}}
        ingress = {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.25,
                                                             "runtime_env": {"env_vars": TEST_CREDENTIALS}}}
        yield args, [ingress], server


@pytest.fixture()
def http(served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client


def decode_png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
