"""pconv.storage.uris against the local filesystem and a real moto S3 server (over HTTP, endpoint from the env)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pyarrow as pa
import pytest

from pconv.storage import uris
pytestmark = pytest.mark.integration


def test_is_remote_and_join():
    assert uris.is_remote("s3://b/k")
    assert not uris.is_remote("/tmp/x")
    assert not uris.is_remote("file:///tmp/x")
    assert uris.join("s3://b/", "a/", "/c.txt") == "s3://b/a/c.txt"
    assert uris.join("s3://b", "") == "s3://b"
    assert uris.join("/tmp/a", "b", "c") == "/tmp/a/b/c"


def test_roundtrip_list_exists_delete_local(tmp_path):
    roundtrip_list_exists_delete(str(tmp_path / "root"))


def test_roundtrip_list_exists_delete_s3(s3_bucket):
    roundtrip_list_exists_delete(s3_bucket + "/prefix")


def roundtrip_list_exists_delete(root: str) -> None:
    assert not uris.exists(uris.join(root, "a.bin"))
    uris.makedirs(root)
    uris.write_bytes_atomic(uris.join(root, "a.bin"), b"alpha")
    uris.write_bytes_atomic(uris.join(root, "sub", "deep", "b.PNG"), b"beta")
    uris.write_bytes_atomic(uris.join(root, "sub", "c.txt"), b"")
    assert uris.read_bytes(uris.join(root, "a.bin")) == b"alpha"
    assert uris.read_bytes(uris.join(root, "sub", "c.txt")) == b""
    assert uris.exists(uris.join(root, "sub"))  # a "directory" / prefix
    files = uris.list_files(root)
    assert files == sorted(files) and len(files) == 3
    assert uris.list_files(root, suffixes=(".png",)) == [uris.join(root, "sub", "deep", "b.PNG")]
    # overwrite is whole
    uris.write_bytes_atomic(uris.join(root, "a.bin"), b"alpha2")
    assert uris.read_bytes(uris.join(root, "a.bin")) == b"alpha2"
    uris.delete(uris.join(root, "a.bin"))
    assert not uris.exists(uris.join(root, "a.bin"))
    with pytest.raises(FileNotFoundError, match="a.bin"):
        uris.read_bytes(uris.join(root, "a.bin"))


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "d" / "x.json"
    for i in range(3):
        uris.write_bytes_atomic(str(target), f"{i}".encode())
    assert target.read_bytes() == b"2"
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
@pytest.mark.parametrize("proc", [True, False])
def test_local_atomic_write_respects_the_umask(tmp_path, monkeypatch, umask, mode, proc):
    """Shards and manifests of a shared dataset must be readable by others when the umask says so (issue 19.9):
    mkstemp alone creates 0600 files."""
    if not proc:  # no /proc (macOS, some containers): the set-and-restore fallback gives the same answer
        def no_proc(*_a, **_k):
            raise OSError("no /proc here")
        monkeypatch.setattr(uris, "open", no_proc, raising=False)
    old = os.umask(umask)
    try:
        target = tmp_path / "shared" / "manifest.json"
        uris.write_bytes_atomic(str(target), b"{}")
        uris.write_bytes_atomic(str(target), b"{}")  # replacing keeps the rule
        assert os.umask(umask) == umask  # the write did not change the umask
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == mode


def test_missing_local_dir_and_bucket(tmp_path, s3_server):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        uris.list_files(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        uris.list_files("s3://no-such-bucket-xyz/prefix")
    assert not uris.exists("s3://no-such-bucket-xyz/prefix")


def test_upload_dir(tmp_path, s3_bucket):
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "state.pt").write_bytes(b"\x00\x01" * 100)
    (src / "x" / "meta.json").write_text("{}")
    uri = uris.join(s3_bucket, "ckpt")
    uris.upload_dir(str(src), uri)
    assert uris.list_files(uri) == [f"{uri}/state.pt", f"{uri}/x/meta.json"]
    assert uris.read_bytes(f"{uri}/state.pt") == b"\x00\x01" * 100
    assert uris.read_bytes(f"{uri}/x/meta.json") == b"{}"
    with pytest.raises(FileNotFoundError):
        uris.upload_dir(str(tmp_path / "missing"), uri)


def test_pyarrow_filesystem_uses_env_endpoint(s3_server, s3_bucket):
    """The pyarrow filesystem reaches the moto server through AWS_ENDPOINT_URL; paths carry no scheme."""
    uri = uris.join(s3_bucket, "t", "x.parquet")
    fs, path = uris.get_filesystem(uri)
    assert not path.startswith("s3://") and path == uri[len("s3://"):]
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    table = pa.table({"a": [1, 2, 3]})
    with fs.open_output_stream(path) as fh:
        pq.write_table(table, fh)
    assert uris.exists(uri)  # written by pyarrow, seen by boto3: same endpoint
    with fs.open_input_file(path) as fh:
        assert pq.read_table(fh).column("a").to_pylist() == [1, 2, 3]
    fs2, paths = uris.ray_paths([uri, uris.join(s3_bucket, "t", "y.parquet")])
    assert paths == [path, path.replace("x.parquet", "y.parquet")]
    with pytest.raises(ValueError, match="mix"):
        uris.ray_paths([uri, "/tmp/local.parquet"])


def test_one_list_of_aws_variables_keys_the_clients_and_is_forwarded(monkeypatch):
    """uris.AWS_ENV_VARS (+ the profile) selects the cached clients; batch actors are given the same list."""
    from pconv.inference import batch
    assert batch._FORWARD_ENV is uris.AWS_ENV_VARS
    assert uris.AWS_PROFILE_VAR not in uris.AWS_ENV_VARS  # names a local file section: not forwarded
    base = uris.s3_settings()
    for name in (*uris.AWS_ENV_VARS, uris.AWS_PROFILE_VAR):
        with monkeypatch.context() as env:
            env.setenv(name, "changed-value")
            assert uris.s3_settings() != base, name


def test_a_ranged_file_reads_exact_lengths_and_serves_zipfile(tmp_path):
    """uris.open_ranged: what zipfile reads an S3 zip through (here on a local file: the same reads, no server);
    its S3 retries are in tests/test_s3_faults.py."""
    import zipfile

    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/one.txt", b"one" * 100)
        zf.writestr("two.bin", bytes(range(256)))
    size = path.stat().st_size
    with uris.open_ranged(str(path)) as f, zipfile.ZipFile(f) as zf:  # type: ignore[arg-type]
        assert f.size == size and zf.read("x/one.txt") == b"one" * 100 and zf.read("two.bin") == bytes(range(256))
        assert f.read_at(10, size - 4) == path.read_bytes()[-4:]  # clipped at the end, never short elsewhere
        assert f.read_at(10, size + 5) == b""
        assert f.seek(-3, os.SEEK_END) == size - 3 and f.read() == path.read_bytes()[-3:] and f.tell() == size
        with pytest.raises(OSError, match="before the start"):
            f.seek(-1)
    with pytest.raises(FileNotFoundError):
        uris.open_ranged(str(tmp_path / "missing.zip"))
