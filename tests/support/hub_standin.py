"""A local stand-in for the Hugging Face Hub API: a real HTTP server on 127.0.0.1 implementing
the endpoints `HfApi.create_repo` and `HfApi.upload_folder` call (repo creation, README metadata
validation, preupload, commit with every file inline). Point huggingface_hub at it with HF_ENDPOINT; it stores each
uploaded file's bytes so tests can compare them with the local model."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List


class HubStandIn:
    def __init__(self, fail: bool = False):
        self.repos: Dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}}
        self.requests: List[str] = []
        self.fail = fail  # answer every request with HTTP 500
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def do_GET(self):
                hub.requests.append(f"GET {self.path}")
                self._reply(404, {"error": "not implemented in the stand-in"})

            def do_POST(self):
                hub.requests.append(f"POST {self.path}")
                body = self._body()
                if hub.fail:
                    return self._reply(500, {"error": "stand-in told to fail"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo_id = f"{req.get('organization') or 'user'}/{req['name']}" if "/" not in req["name"] else req["name"]
                    private = req.get("visibility", "private" if req.get("private") else "public") == "private"
                    hub.repos.setdefault(repo_id, {"private": private, "files": {}})
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if parts[:2] == ["api", "validate-yaml"]:  # checks a README.md's metadata block
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and "preupload" in parts:
                    files = json.loads(body).get("files", [])
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files],
                                             "commitOid": "0" * 40})
                if parts[:2] == ["api", "models"] and "commit" in parts:
                    repo_id = "/".join(parts[2:parts.index("commit")])
                    repo = hub.repos.setdefault(repo_id, {"private": False, "files": {}})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            value = item["value"]
                            repo["files"][value["path"]] = base64.b64decode(value["content"])
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{'1' * 40}",
                                             "commitOid": "1" * 40})
                return self._reply(404, {"error": f"no stand-in for {self.path}"})

        return Handler
