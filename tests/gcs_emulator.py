"""Local Google Cloud Storage servers for the tests: the gcp-storage-emulator package (a real server
of the GCS JSON API, in memory) and a server that answers every request as GCS does for an account
without access (HTTP 403; the emulator has no permission model).

``python tests/gcs_emulator.py PORT BUCKET`` runs the emulator with one gap to GCS closed: GCS sends
an object's generation with its bytes (``x-goog-generation``), which tensorstore (orbax) needs to
read a checkpoint back; the emulator only puts it in the object's metadata."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    """The variables that point every client at ``url``: gcsfs reads STORAGE_EMULATOR_HOST and then
    needs no credentials; tensorstore (orbax) reads TENSORSTORE_GCS_HTTP_URL, the ArrayRecord reader
    (google-cloud-cpp) CLOUD_STORAGE_EMULATOR_ENDPOINT. gcsfs's probe for zonal buckets asks a gRPC
    endpoint that an emulator does not serve: off."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "test",
    }


def _wait_for(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the storage emulator exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the storage emulator did not listen on port {port} within {timeout} s")


@contextlib.contextmanager
def emulator(bucket: str):
    """Runs gcp-storage-emulator (in memory) with ``bucket`` on a free port; yields its URL; stops
    it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, str(port), bucket],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def _deny(self):
        body = json.dumps(
            {
                "error": {
                    "code": 403,
                    "message": "caller does not have storage.objects.create access",
                    "errors": [{"reason": "forbidden"}],
                }
            }
        ).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _deny

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def forbidden_server():
    """A local server that refuses every request with GCS's 403 answer; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def env_with(url: str) -> dict[str, str]:
    return {**os.environ, **client_env(url)}


def _serve(port: int, bucket: str) -> None:
    from gcp_storage_emulator.handlers import objects
    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status < 300:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    objects.download = download_with_generation  # before the server module binds its routes
    from gcp_storage_emulator.server import create_server
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
