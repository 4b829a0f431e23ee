"""Shards behind HTTP (a server on 127.0.0.1 that this test starts and can make drop connections
mid-shard) and behind a `pipe:` command: stream mode reads them with the batches of the local
split, a dropped connection is retried and costs no sample, a shard that keeps failing stops with
an error naming it after the retries (never a short epoch), and training on a remote data.path
gives the losses of the same run on the local copy."""
import http.server
import json
import socket
import threading
from functools import partial

import pytest
import torch

from lflm_dist.data.loader import TokenBatches
from lflm_dist.data.remote import RemoteDir
from lflm_dist.data.shards import ShardError
from test_train import launch, losses


class DroppingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; a path with drops left gets its headers and the first `cut` bytes of
    its body, then the connection is closed under it."""
    drops: dict = {}
    cut = 3000
    served: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        self.served.append(name)
        if self.drops.get(name, 0) > 0 and name.endswith(".tar"):
            self.drops[name] -= 1
            path = self.translate_path(self.path)
            data = open(path, "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:self.cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tiny_data):
    DroppingHandler.drops, DroppingHandler.served = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(DroppingHandler, directory=str(tiny_data)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def batches(split, n, **kw):
    it = iter(TokenBatches(split, global_batch_size=8, mode="stream", num_workers=0, **kw))
    return [next(it)["input_ids"] for _ in range(n)]


def shard_names(tiny_data):
    return [e["name"] for e in json.loads((tiny_data / "train" / "manifest.json").read_text())["shards"]]


def test_remote_split_streams_the_local_splits_batches(server, tiny_data):
    remote = RemoteDir(server, retries=0).child("train")
    local = batches(tiny_data / "train", 6)
    assert all(torch.equal(a, b) for a, b in zip(batches(remote, 6), local))
    piped = RemoteDir(f"pipe:cat {tiny_data}/{{path}}", retries=0).child("train")
    assert all(torch.equal(a, b) for a, b in zip(batches(piped, 6), local))


def test_dropped_connections_are_retried_without_losing_a_sample(server, tiny_data, capsys):
    DroppingHandler.drops = {f"train/{n}": 2 for n in shard_names(tiny_data)}
    remote = RemoteDir(server, retries=3, backoff_s=0.01).child("train")
    got = batches(remote, 6)
    assert all(torch.equal(a, b) for a, b in zip(got, batches(tiny_data / "train", 6)))
    assert "retry 2/3" in capsys.readouterr().err
    assert any(DroppingHandler.drops[k] == 0 for k in DroppingHandler.drops)  # the drops did happen


def test_a_shard_that_keeps_failing_stops_naming_it(server, tiny_data):
    DroppingHandler.drops = {f"train/{n}": 99 for n in shard_names(tiny_data)}
    remote = RemoteDir(server, retries=2, backoff_s=0.01).child("train")
    with pytest.raises(ShardError, match=rf"train/shard-\d+\.tar.*gave up after 2 retries, having read \d+ of \d+"):
        batches(remote, 6)
    bad = RemoteDir(f"pipe:cat {tiny_data}/nowhere/{{path}}", retries=1, backoff_s=0.01).child("train")
    with pytest.raises(ShardError, match="exited with 1"):
        batches(bad, 1)


def test_training_on_a_remote_data_path_matches_the_local_copy(server, tiny_data, tmp_path):
    DroppingHandler.drops = {f"train/{n}": 1 for n in shard_names(tiny_data)}
    common = ("train.max_steps=3", "data.loader=stream", "data.retry_backoff_s=0.01")
    launch(tiny_data, tmp_path / "local", *common)
    p = launch(tiny_data, tmp_path / "remote", *common, f"data.path={server}")
    assert "retry 1/5" in p.stderr
    assert losses(tmp_path / "remote") == losses(tmp_path / "local")
    p = launch(tiny_data, tmp_path / "indexed", "train.max_steps=1", f"data.path={server}", expect=2)
    assert "is remote: set data.loader=stream" in p.stderr


def test_splits_as_brace_patterns_of_urls_and_commands(server, tiny_data, tmp_path):
    """A split written as webdataset users write it, with the tokenizer from a local data.path."""
    n = len(shard_names(tiny_data))
    urls = f"{server}/train/shard-{{000000..{n - 1:06d}}}.tar"
    nv = len(json.loads((tiny_data / "valid" / "manifest.json").read_text())["shards"])
    cmds = f"pipe:cat {tiny_data}/valid/shard-{{000000..{nv - 1:06d}}}.tar"
    common = ("train.max_steps=3", "data.loader=stream")
    launch(tiny_data, tmp_path / "local", *common)
    launch(tiny_data, tmp_path / "braced", *common, f"data.train_split={urls}", f"data.valid_split={cmds}")
    assert losses(tmp_path / "braced") == losses(tmp_path / "local")
    short = f"{server}/train/shard-{{000000..{n:06d}}}.tar"  # one shard too many
    p = launch(tiny_data, tmp_path / "bad", *common, f"data.train_split={short}", expect=2)
    assert "does not name the shards its manifest" in p.stderr and f"shard-{n:06d}.tar" in p.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # refused before training
