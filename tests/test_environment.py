"""The environment has what README and book/setup.md promise: JupyterLab that starts and answers."""

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from labsupport.serving.process import free_port


def test_jupyter_lab_starts_on_loopback_and_answers(tmp_path):
    pytest.importorskip("jupyterlab", reason="JupyterLab is in requirements.txt, not in the floors")
    pytest.importorskip("ipywidgets", reason="ipywidgets is in requirements.txt, not in the floors")
    port, token = free_port(), secrets.token_hex(16)
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--ServerApp.port_retries=0", *(["--allow-root"] if os.geteuid() == 0 else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and lab.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/lab?token={token}"
                with urllib.request.urlopen(url, timeout=5) as response:
                    status, page = response.status, response.read().decode()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert lab.poll() is None, f"jupyter lab exited: {lab.stderr.read()[-2000:]}"
        assert status == 200 and "JupyterLab" in page
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait()
