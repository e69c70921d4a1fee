"""Serves requests on a two-node Ray cluster started on this machine, with the Denoiser and the
VaeDecoder on node "b" and the other stages on node "a", by custom resources given through the app's
args, as an operator pins stages. (What one node serves is the test session's shared app, which
other modules compare with the local pipeline; the test compares this one with it too.)

Run as a script by tests/integration/test_two_nodes.py (a Ray driver of its own, apart from the test
session's Ray instance, with its own ports and, from RAY_TMPDIR, its own temporary folder), with the
cache dir and JSON `{"requests": [...], "args": {...}}`: the generation requests to send and app args
beside the model's. Prints one line, "RESULT " and JSON: each request's status
with its PNG (base64) or error, the node each stage ran on, and `GET /v1/loras`.
"""

from __future__ import annotations

import json
import socket
import sys

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

PINS = {"ingress": "node_a", "prompt_styler": "node_a", "text_encoder": "node_a", "denoiser": "node_b",
        "vae": "node_b"}
NAMES = {"ingress": "Ingress", "prompt_styler": "PromptStyler", "text_encoder": "TextEncoder",
         "denoiser": "Denoiser", "vae": "VaeDecoder"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(cache_dir: str, spec: dict) -> None:
    # Ports of its own, so that another Ray instance on the machine (a `serve run` on the default ports)
    # is neither in the way nor found: the Cluster helper's head would take 8265 for its dashboard, which
    # the state API below needs, and the address is given to every call rather than discovered.
    head = {"num_cpus": 3, "resources": {"node_a": 1}, "include_dashboard": True, "dashboard_port": free_port(),
            "gcs_server_port": free_port(), "dashboard_agent_listen_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    node_b = cluster.add_node(num_cpus=3, resources={"node_b": 1}, dashboard_agent_listen_port=free_port())
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from serve_app import build_app

        url = f"http://127.0.0.1:{port}/v1/images/generations"
        args = {"model": "tiny", "device": "cpu", "cache_dir": cache_dir, **spec.get("args", {})}
        for stage, resource in PINS.items():
            args[stage] = {"ray_actor_options": {"resources": {resource: 0.01}}}
        serve.run(build_app(args), name="zimage", route_prefix="/")
        responses = []
        for request in spec["requests"]:
            response = httpx.post(url, json=request, timeout=300)
            body = response.json()
            responses.append({"status": response.status_code, "b64_json": body["data"][0]["b64_json"]}
                             if response.status_code == 200 else {"status": response.status_code, **body})
        nodes = {}
        for stage, name in NAMES.items():
            actors = list_actors(address=cluster.address, filters=[("class_name", "=", f"ServeReplica:zimage:{name}"), ("state", "=", "ALIVE")])
            nodes[stage] = "b" if actors and all(a.node_id == node_b.node_id for a in actors) else "a"
        listing = httpx.get(f"http://127.0.0.1:{port}/v1/loras", timeout=60).json()["data"]
        result = {"responses": responses, "nodes": nodes, "loras": listing}
        print("RESULT", json.dumps(result))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
