"""The real data path (img2dataset over LAION parquet metadata) against a server on 127.0.0.1."""

import http.server
import io
import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unlearn.data.laion import LaionConfig, download_laion, input_parquets, link_eval_sets
from unlearn.data.shards import iter_samples, shard_contact_sheet
from unlearn.errors import UnlearnError

GOOD = 6


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (40 * i % 255, 90, 160)).save(buf, format="JPEG")
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path.startswith("/img/"):
            body, ctype = _jpeg(int(self.path.split("/")[-1].split(".")[0])), "image/jpeg"
        elif self.path == "/slow.jpg":
            time.sleep(4)
            body, ctype = _jpeg(0), "image/jpeg"
        elif self.path == "/text.jpg":
            body, ctype = b"<html>not an image</html>", "text/html"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_img2dataset_against_local_server(server, tmp_path):
    rows = [{"URL": f"{server}/img/{i}.jpg", "TEXT": f"caption {i}"} for i in range(GOOD)]
    rows += [{"URL": f"{server}/missing.jpg", "TEXT": "gone"}, {"URL": f"{server}/text.jpg", "TEXT": "html"}, {"URL": f"{server}/slow.jpg", "TEXT": "slow"}]
    _parquet(tmp_path / "meta" / "part-00000.parquet", rows)
    out = tmp_path / "out"
    out.mkdir()
    cfg = LaionConfig(parquet_dir=str(tmp_path / "meta"), image_size=32, processes=1, threads=4, timeout=1, samples_per_shard=100)
    download_laion(cfg, out)
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == len(rows)
    assert stats["successes"] == GOOD
    assert stats["failed_to_download"] + stats["failed_to_resize"] == 3
    samples = list(iter_samples(out))
    assert sorted(s.caption for s in samples) == sorted(f"caption {i}" for i in range(GOOD))
    assert all(Image.open(io.BytesIO(s.jpg)).size == (32, 32) for s in samples)
    assert (out / "00000.parquet").exists()
    shard_contact_sheet(out, tmp_path / "sheet.png")
    assert Image.open(tmp_path / "sheet.png").size[1] > 0


def test_bad_parquet_inputs(tmp_path):
    with pytest.raises(UnlearnError, match="not found"):
        input_parquets(LaionConfig(parquet_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnlearnError, match=r"no \.parquet"):
        input_parquets(LaionConfig(parquet_dir=str(tmp_path / "empty")))
    _parquet(tmp_path / "cols" / "a.parquet", [{"url": "x", "caption": "y"}])
    with pytest.raises(UnlearnError, match="URL/TEXT"):
        input_parquets(LaionConfig(parquet_dir=str(tmp_path / "cols")))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.parquet").write_bytes(b"not parquet")
    with pytest.raises(UnlearnError, match="not a readable parquet"):
        input_parquets(LaionConfig(parquet_dir=str(tmp_path / "junk")))


def test_real_eval_folders_are_checked_and_linked(tiny_world, tmp_path):
    info = link_eval_sets(str(tiny_world / "eval" / "celeba"), str(tiny_world / "eval" / "imagenet"), tmp_path)
    assert info["celeba_images"] > 0 and (tmp_path / "celeba" / "identity_names.txt").exists()
    with pytest.raises(UnlearnError, match="CelebA image folder"):
        link_eval_sets(str(tmp_path / "nothing"), str(tiny_world / "eval" / "imagenet"), tmp_path / "x")
