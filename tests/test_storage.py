"""pconv.storage against the local filesystem and a real moto S3 server (over HTTP, endpoint from the env)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pyarrow as pa
import pytest

from pconv import storage

pytestmark = pytest.mark.integration


def test_is_remote_and_join():
    assert storage.is_remote("s3://b/k")
    assert not storage.is_remote("/tmp/x")
    assert not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://b/", "a/", "/c.txt") == "s3://b/a/c.txt"
    assert storage.join("s3://b", "") == "s3://b"
    assert storage.join("/tmp/a", "b", "c") == "/tmp/a/b/c"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_roundtrip_list_exists_delete(root):
    assert not storage.exists(storage.join(root, "a.bin"))
    storage.makedirs(root)
    storage.write_bytes_atomic(storage.join(root, "a.bin"), b"alpha")
    storage.write_bytes_atomic(storage.join(root, "sub", "deep", "b.PNG"), b"beta")
    storage.write_bytes_atomic(storage.join(root, "sub", "c.txt"), b"")
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"alpha"
    assert storage.read_bytes(storage.join(root, "sub", "c.txt")) == b""
    assert storage.exists(storage.join(root, "sub"))  # a "directory" / prefix
    files = storage.list_files(root)
    assert files == sorted(files) and len(files) == 3
    assert storage.list_files(root, suffixes=(".png",)) == [storage.join(root, "sub", "deep", "b.PNG")]
    # overwrite is whole
    storage.write_bytes_atomic(storage.join(root, "a.bin"), b"alpha2")
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"alpha2"
    storage.delete(storage.join(root, "a.bin"))
    assert not storage.exists(storage.join(root, "a.bin"))
    with pytest.raises(FileNotFoundError, match="a.bin"):
        storage.read_bytes(storage.join(root, "a.bin"))


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "d" / "x.json"
    for i in range(3):
        storage.write_bytes_atomic(str(target), f"{i}".encode())
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
        monkeypatch.setattr(storage, "open", no_proc, raising=False)
    old = os.umask(umask)
    try:
        target = tmp_path / "shared" / "manifest.json"
        storage.write_bytes_atomic(str(target), b"{}")
        storage.write_bytes_atomic(str(target), b"{}")  # replacing keeps the rule
        assert os.umask(umask) == umask  # the write did not change the umask
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == mode


def test_missing_local_dir_and_bucket(tmp_path, s3_server):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        storage.list_files(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.list_files("s3://no-such-bucket-xyz/prefix")
    assert not storage.exists("s3://no-such-bucket-xyz/prefix")


def test_upload_dir(tmp_path, s3_bucket):
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "state.pt").write_bytes(b"\x00\x01" * 100)
    (src / "x" / "meta.json").write_text("{}")
    uri = storage.join(s3_bucket, "ckpt")
    storage.upload_dir(str(src), uri)
    assert storage.list_files(uri) == [f"{uri}/state.pt", f"{uri}/x/meta.json"]
    assert storage.read_bytes(f"{uri}/state.pt") == b"\x00\x01" * 100
    assert storage.read_bytes(f"{uri}/x/meta.json") == b"{}"
    with pytest.raises(FileNotFoundError):
        storage.upload_dir(str(tmp_path / "missing"), uri)


def test_pyarrow_filesystem_uses_env_endpoint(s3_server, s3_bucket):
    """The pyarrow filesystem reaches the moto server through AWS_ENDPOINT_URL; paths carry no scheme."""
    uri = storage.join(s3_bucket, "t", "x.parquet")
    fs, path = storage.get_filesystem(uri)
    assert not path.startswith("s3://") and path == uri[len("s3://"):]
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    table = pa.table({"a": [1, 2, 3]})
    with fs.open_output_stream(path) as fh:
        pq.write_table(table, fh)
    assert storage.exists(uri)  # written by pyarrow, seen by boto3: same endpoint
    with fs.open_input_file(path) as fh:
        assert pq.read_table(fh).column("a").to_pylist() == [1, 2, 3]
    fs2, paths = storage.ray_paths([uri, storage.join(s3_bucket, "t", "y.parquet")])
    assert paths == [path, path.replace("x.parquet", "y.parquet")]
    with pytest.raises(ValueError, match="mix"):
        storage.ray_paths([uri, "/tmp/local.parquet"])


def test_one_list_of_aws_variables_keys_the_clients_and_is_forwarded(monkeypatch):
    """storage.AWS_ENV_VARS (+ the profile) selects the cached clients; batch actors are given the same list."""
    from pconv import batch

    assert batch._FORWARD_ENV is storage.AWS_ENV_VARS
    assert storage.AWS_PROFILE_VAR not in storage.AWS_ENV_VARS  # names a local file section: not forwarded
    base = storage._env_key()
    for name in (*storage.AWS_ENV_VARS, storage.AWS_PROFILE_VAR):
        with monkeypatch.context() as env:
            env.setenv(name, "changed-value")
            assert storage._env_key() != base, name
