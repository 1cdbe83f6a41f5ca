"""`covey up`: one command starts a network, prints a curl line that works, Ctrl-C stops all."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import free_port


def test_up_prints_working_curl_and_stops_cleanly_on_ctrl_c(tmp_path: Path):
    port = free_port()
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "covey",
            "up",
            "--port",
            str(port),
            "--miners",
            "2",
            "--data-dir",
            str(tmp_path / ".covey"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "covey up exited early:\n" + "".join(lines)
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        curl = next(x.strip() for x in lines if x.strip().startswith("curl "))
        assert f"127.0.0.1:{port}" in curl
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) == 3  # a coordinator and two miners

        pasted = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        answer = json.loads(pasted.stdout)
        assert answer["choices"][0]["message"]["content"].strip()
        assert answer["usage"]["completion_tokens"] > 0

        # The bundled embedding model is served from the same miners.
        curl_embed = next(x.strip() for x in lines if "/v1/embeddings" in x)
        pasted = subprocess.run(curl_embed, shell=True, capture_output=True, text=True,
                                timeout=60)
        vectors = json.loads(pasted.stdout)
        assert [len(d["embedding"]) for d in vectors["data"]] == [384, 384]
        assert vectors["usage"]["prompt_tokens"] > 0

        # The bundled voice and transcription model too: the two curl lines chain.
        curl_speech = next(x.strip() for x in lines if "/v1/audio/speech" in x)
        spoken = subprocess.run(curl_speech, shell=True, capture_output=True, text=True,
                                timeout=60, cwd=tmp_path)
        assert spoken.returncode == 0 and (tmp_path / "hello.mp3").stat().st_size > 1000
        curl_listen = next(x.strip() for x in lines if "/v1/audio/transcriptions" in x)
        heard = subprocess.run(curl_listen, shell=True, capture_output=True, text=True,
                               timeout=60, cwd=tmp_path)
        assert "hello" in json.loads(heard.stdout)["text"].lower(), heard.stdout
    finally:
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=20)
    assert up.returncode == 0
    assert "stopped." in rest
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert (tmp_path / ".covey" / "miner-0" / "miner.key").exists()
