"""A local stand-in for the Hugging Face Hub API: a real HTTP server on 127.0.0.1 implementing
the endpoints `HfApi.create_repo` and `HfApi.upload_folder` call (repo creation, README metadata
validation, preupload, the LFS batch API with its basic transfer and verify for large files,
commit). As on the Hub, weight files (`*.safetensors`, `*.bin`) go through LFS (their bytes PUT
separately, the commit naming them by sha256) and the rest inline. Point huggingface_hub at it
with HF_ENDPOINT and HF_HUB_DISABLE_XET=1 (the stand-in speaks LFS, not the Xet storage protocol
huggingface_hub prefers when hf_xet is installed); it stores each uploaded file's bytes so
tests can compare them with the local model."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List


class HubStandIn:
    def __init__(self, fail: bool = False):
        self.repos: Dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}}
        self.lfs_objects: Dict[str, bytes] = {}  # sha256 -> bytes PUT through the LFS transfer
        self.lfs_files: List[str] = []  # paths committed as LFS pointers
        self.requests: List[str] = []
        self.fail = fail  # answer every request with HTTP 500
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def client_env(self) -> Dict[str, str]:
        """What a launched command needs to upload here (HF_TOKEN: any value; the stand-in checks none)."""
        return dict(HF_ENDPOINT=self.endpoint, HF_HUB_OFFLINE="0", HF_TOKEN="hf_standin", HF_HUB_DISABLE_XET="1")

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
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                body = b""  # a file streamed by the client: <hex size>\r\n<bytes>\r\n ... 0\r\n\r\n
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body

            def do_GET(self):
                hub.requests.append(f"GET {self.path}")
                self._reply(404, {"error": "not implemented in the stand-in"})

            def do_PUT(self):
                """The LFS basic transfer: the object's bytes, at the href the batch answered."""
                hub.requests.append(f"PUT {self.path}")
                body = self._body()
                oid = self.path.rstrip("/").rsplit("/", 1)[-1]
                if hub.fail or hashlib.sha256(body).hexdigest() != oid:
                    return self._reply(500 if hub.fail else 400, {"error": "stand-in refused the upload"})
                hub.lfs_objects[oid] = body
                self._reply(200, {})

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
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": upload_mode(f["path"]),
                                                        "shouldIgnore": False} for f in files],
                                             "commitOid": "0" * 40})
                if self.path.endswith(".git/info/lfs/objects/batch"):
                    return self._reply(200, {"transfer": "basic", "objects": [
                        self._lfs_actions(o) for o in json.loads(body)["objects"]]})
                if parts[:2] == ["lfs", "verify"]:
                    req = json.loads(body)
                    known = req["oid"] in hub.lfs_objects and len(hub.lfs_objects[req["oid"]]) == req["size"]
                    return self._reply(200 if known else 404, {})
                if parts[:2] == ["api", "models"] and "commit" in parts:
                    repo_id = "/".join(parts[2:parts.index("commit")])
                    repo = hub.repos.setdefault(repo_id, {"private": False, "files": {}})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        value = item.get("value", {})
                        if item.get("key") == "file":
                            repo["files"][value["path"]] = base64.b64decode(value["content"])
                        elif item.get("key") == "lfsFile":  # the bytes came through the LFS transfer
                            if value["oid"] not in hub.lfs_objects:
                                return self._reply(400, {"error": f"LFS object of {value['path']} was never uploaded"})
                            repo["files"][value["path"]] = hub.lfs_objects[value["oid"]]
                            hub.lfs_files.append(value["path"])
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{'1' * 40}",
                                             "commitOid": "1" * 40})
                return self._reply(404, {"error": f"no stand-in for {self.path}"})

            def _lfs_actions(self, obj: dict) -> dict:
                """Where to PUT an object, and where to confirm it; none for one already stored."""
                if obj["oid"] in hub.lfs_objects:
                    return {"oid": obj["oid"], "size": obj["size"]}
                return {"oid": obj["oid"], "size": obj["size"], "authenticated": True, "actions": {
                    "upload": {"href": f"{hub.endpoint}/lfs/objects/{obj['oid']}"},
                    "verify": {"href": f"{hub.endpoint}/lfs/verify"}}}

        return Handler


LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
"""What the Hub's default .gitattributes stores in LFS (a subset: the model files written here)."""


def upload_mode(path: str) -> str:
    return "lfs" if any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS) else "regular"
