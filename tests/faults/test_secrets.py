"""The API key through a whole CLI run against a local OpenAI-compatible server: it appears in no log line,
output file (manifest, results, report) or message."""

from __future__ import annotations

import logging
import shutil
import threading


from helpers import TINY_RUN
from nl_rewrite.cli.main import main


KEY = "sk-secret-run-9f8e7d6c5b4a"


def test_the_key_never_leaves_the_process(tmp_cache, tmp_path, monkeypatch, caplog, capsys, tiny_run):
    from nl_rewrite.llm.embedded import EmbeddedBackend
    from nl_rewrite.llm.server import make_server

    shutil.copytree(tiny_run.cache / "coders", tmp_cache / "coders")  # its transcoder: no key is involved in training

    server = make_server(EmbeddedBackend("tiny-smollm2"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    out = tmp_path / "run"
    try:
        with caplog.at_level(logging.DEBUG):
            # one position mode on half the eval windows and a pool of 2: every kind of stage still runs and writes
            code = main(["run", *TINY_RUN, "--out", str(out), "--llm", f"openai:tiny-smollm2@{url}",
                         "--position-modes", "all", "--eval-windows", "4", "--pool", "2"])
    finally:
        server.shutdown()
        server.server_close()
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files) and any(p.name == "results.json" for p in files)
    leaks = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    assert not leaks and KEY not in caplog.text and KEY not in printed.out + printed.err
    assert f"openai:tiny-smollm2@{url}" in (out / "manifest.json").read_text()  # the run did use the server
