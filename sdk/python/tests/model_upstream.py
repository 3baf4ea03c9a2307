"""A real HTTP server standing in for a model API (OpenAI's chat
completions), counting the calls it gets. Runs in a thread of the test."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .conftest import Sidecar, dev_sidecar, free_port


class ModelUpstream:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with upstream.lock:
                    upstream.calls.append(
                        {
                            "path": self.path,
                            "authorization": self.headers.get("authorization"),
                            "task_key": self.headers.get("x-statefabric-task-key"),
                            "traceparent": self.headers.get("traceparent"),
                            "body": body,
                        }
                    )
                    n = len(upstream.calls)
                prompt = body.get("messages", [{}])[-1].get("content", "")
                answer = {
                    "id": f"chatcmpl-{n}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "m"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"answer #{n} to {prompt}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                payload = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def mesh_file(self, path: str) -> str:
        """An Upstream `model` for this server, holding the API key."""
        with open(path, "w") as f:
            f.write(
                "apiVersion: statefabric.io/v1alpha1\n"
                "kind: Upstream\n"
                "metadata: {name: model}\n"
                "spec:\n"
                f"  url: http://127.0.0.1:{self.port}/v1\n"
                "  headers: [{name: Authorization, value: Bearer sk-held-by-the-sidecar}]\n"
            )
        return path

    def close(self) -> None:
        self.server.shutdown()


def dev_with_egress(model: ModelUpstream) -> Sidecar:
    """`fabric dev` with its egress listener on (`.egress` is its URL) and
    the Upstream `model` pointing at `model`."""
    mesh = model.mesh_file(os.path.join(tempfile.mkdtemp(), "mesh.yaml"))
    listen = f"127.0.0.1:{free_port()}"
    sidecar = dev_sidecar(
        {
            "STATEFABRIC_MESH__FILES": json.dumps([mesh]),
            "STATEFABRIC_EGRESS__ENABLED": "true",
            "STATEFABRIC_EGRESS__LISTEN": listen,
        }
    )
    sidecar.egress = f"http://{listen}"
    return sidecar
