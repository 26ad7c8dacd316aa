"""Bounded memory at production size (issue 15): validation pairs and the evaluation read and decode only what they
use, and the evaluation streams its images in batches with the same numbers as decoding them all first.

Counting is done two ways: spies that wrap (and call) the real read / decode functions, and data that proves it —
sets whose rows or files beyond what is used are corrupt, so reading or decoding any of them would show up as a
skipped image. No Ray, no server.
"""

from __future__ import annotations

import io
import json
import sys
import weakref
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pconv.core import images
from pconv.core.unet import build_model
from pconv.data.stream import load_val_pairs
from pconv.data.transforms import load_mask_bank
from pconv.evaluation import inpainting, inputs
from pconv.storage import shards, sources, uris

SIZE = 32
GOOD = [f"k{i}.png" for i in range(3)]                 # sort first: what --limit 3 / val_size 3 picks
BAD = [f"x_bad{i}.png" for i in range(5)]              # sort after every good key; never decodable
WRITE_ORDER = [GOOD[0], BAD[0], GOOD[1], BAD[1], BAD[2], BAD[3], GOOD[2], BAD[4]]  # 2 rows per row group


def _png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _blob(key: str) -> bytes:
    return _png(GOOD.index(key)) if key in GOOD else b"\x89PNG\r\n\x1a\n" + b"\x00" * 40


def _image_root(root: Path, split: str, monkeypatch) -> str:
    """An image shard root whose one shard has row groups of 2 rows in WRITE_ORDER: the 3 good rows sit in row
    groups 0, 1 and 3; row group 2 holds only corrupt rows."""
    monkeypatch.setattr(shards, "ROW_GROUP_MAX_ROWS", 2)
    writer = shards.ShardWriter(str(root), split, shards.IMAGE_SCHEMA, 2**40, "test", "image")
    for key in WRITE_ORDER:
        writer.add({"key": key, "image": _blob(key), "height": 40, "width": 48, "format": "png", "split": split})
    writer.flush()
    assert writer.shards[0]["row_groups"] == [2, 2, 2, 2]
    manifest = {"schema_version": shards.SCHEMA_VERSION, "kind": shards.IMAGES_KIND, "source": "test",
                "run_id": "test", "counts": {"train": 0, "val": 0, split: len(WRITE_ORDER)}, "shards": writer.shards}
    uris.write_bytes_atomic(uris.join(str(root), shards.MANIFEST), json.dumps(manifest).encode())
    return str(root)


def patch_everywhere(monkeypatch, module, name: str, fake) -> None:
    """Replace ``module.name`` by ``fake``, also in every pconv module that imported it by name."""
    real = getattr(module, name)
    for mod in [module] + [m for n, m in list(sys.modules.items()) if n.startswith("pconv.")]:
        if getattr(mod, name, None) is real:
            monkeypatch.setattr(mod, name, fake)


class Spy:
    """Counts what the real functions do: image decodes (by name) and file / row-group reads."""

    def __init__(self, monkeypatch):
        self.decoded: list[str] = []
        self.files_read: list[str] = []
        self.groups_read: list[tuple[str, int]] = []   # row groups read WITH the image column
        real_open, real_file, real_member = images.open_image, sources._read_file, sources._read_member
        real_group = shards.read_row_group

        def open_image(blob, draft_size=None, name=""):
            self.decoded.append(name.rsplit(":", 1)[-1] if ":" in name else name)
            return real_open(blob, draft_size=draft_size, name=name)

        def read_group(uri, index, columns):
            if "image" in columns:
                self.groups_read.append((uri, index))
            return real_group(uri, index, columns)

        patch_everywhere(monkeypatch, images, "open_image", open_image)
        monkeypatch.setattr(sources, "_read_file", lambda p: self.files_read.append(p.name) or real_file(p))
        monkeypatch.setattr(sources, "_read_member",
                            lambda zf, info: self.files_read.append(info.filename) or real_member(zf, info))
        patch_everywhere(monkeypatch, shards, "read_row_group", read_group)


# ---------------------------------------------------------------------------------------------
# Validation pairs (pconv.data.stream.load_val_pairs, rank 0 of training)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mask_root(tmp_path_factory) -> str:
    from pconv.ingest import ingest_masks

    raw = tmp_path_factory.mktemp("rawmasks")
    for i in range(6):
        m = np.zeros((64, 64), dtype=np.uint8)
        m[8 + 4 * i:30 + 4 * i, 10:20 + 5 * i] = 255  # white = hole
        Image.fromarray(m).save(raw / f"m{i}.png")
    root = str(tmp_path_factory.mktemp("maskshards") / "masks")
    ingest_masks(str(raw), root, hole_color="white", engine="threads", progress=False)
    return root


def test_val_pairs_read_only_the_row_groups_of_the_chosen_rows_and_decode_only_those(tmp_path, monkeypatch,
                                                                                     mask_root):
    root = _image_root(tmp_path / "img", "val", monkeypatch)
    spy = Spy(monkeypatch)
    bank = load_mask_bank(mask_root, "val")
    pairs = load_val_pairs(root, bank, SIZE, limit=len(GOOD))
    assert pairs.keys == GOOD and pairs.skipped == 0  # no corrupt row was decoded
    assert sorted(spy.decoded) == GOOD
    assert sorted(g for _, g in spy.groups_read) == [0, 1, 3]  # row group 2 (corrupt rows only) never read
    ref = np.asarray(images.center_crop(images.open_image(_png(0)), SIZE))
    np.testing.assert_array_equal(pairs.rows["image"][0].transpose(1, 2, 0), ref)

    spy.decoded.clear()
    everything = load_val_pairs(root, bank, SIZE)  # no limit: the corrupt rows are reached, and counted
    assert everything.keys == GOOD and len(spy.decoded) == len(WRITE_ORDER)
    # counted per row group on a surviving row: row group 2 (both rows corrupt) has none to carry its 2 (pconv.data.stream)
    assert everything.skipped == len(BAD) - 2


# ---------------------------------------------------------------------------------------------
# Evaluation images: --limit N reads and decodes N; the stream holds about a batch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_evaluation_limit_reads_and_decodes_only_n_files(tmp_path, monkeypatch, kind):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for key in WRITE_ORDER:
        (folder / key).write_bytes(_blob(key))
    uri = str(folder)
    if kind == "zip":
        uri = str(tmp_path / "imgs.zip")
        with zipfile.ZipFile(uri, "w") as zf:
            for key in WRITE_ORDER:
                zf.writestr(key, _blob(key))
    spy = Spy(monkeypatch)
    skipped: list[str] = []
    keys, decoded = inpainting.load_images(uri, SIZE, limit=len(GOOD), skipped=skipped)
    assert keys == GOOD and skipped == [] and len(decoded) == len(GOOD)
    assert spy.files_read == GOOD and spy.decoded == GOOD

    spy.files_read.clear()
    keys, _ = inpainting.load_images(uri, SIZE, skipped=skipped)  # no limit: every file read, the corrupt ones skipped
    assert keys == GOOD and spy.files_read == GOOD + BAD and len(skipped) == len(BAD)
    assert all(bad in reason for bad, reason in zip(BAD, skipped))


def test_evaluation_limit_on_shards_reads_only_the_row_groups_holding_the_chosen_rows(tmp_path, monkeypatch):
    root = _image_root(tmp_path / "img", "train", monkeypatch)
    spy = Spy(monkeypatch)
    stream = inputs.ImageStream(root, SIZE, limit=len(GOOD), batch_images=2)
    assert stream.keys == GOOD and spy.groups_read == [] and spy.decoded == []  # listing reads the key column only
    batches = list(stream.batches())
    assert [len(b) for b in batches] == [2, 1] and sorted(j for b in batches for j, _ in b) == [0, 1, 2]
    assert sorted(g for _, g in spy.groups_read) == [0, 1, 3] and sorted(spy.decoded) == GOOD
    assert stream.failed == {}

    skipped: list[str] = []
    keys, _ = inpainting.load_images(root, SIZE, skipped=skipped)
    assert keys == GOOD and len(skipped) == len(BAD) and sorted(g for _, g in spy.groups_read[3:]) == [0, 1, 2, 3]


def test_the_stream_keeps_about_one_batch_of_decoded_images_alive(tmp_path, monkeypatch, datasets_dir):
    """Without --limit: a weak reference to every decoded image counts how many are alive at each decode."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((datasets_dir / "cbsd68").glob("*.png"))[:7]:
        (folder / p.name).write_bytes(p.read_bytes())
    es = inpainting.build_eval_set(str(folder), _masks_folder(tmp_path), SIZE, hole_color="white", batch_images=2)
    alive: list[weakref.ref] = []
    peak = [0]
    real_crop = images.center_crop

    def crop(img, size):
        out = real_crop(img, size)
        alive.append(weakref.ref(out))
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return out

    patch_everywhere(monkeypatch, images, "center_crop", crop)
    table = inpainting.evaluate_baseline(es)
    assert len(alive) == 7 and table.count == 7 * len(es.groups)
    assert peak[0] <= 2 * 2  # the batch being decoded + the one being scored, never the whole set


def _masks_folder(tmp_path: Path) -> str:
    """4 raw masks (white = hole) in two hole-ratio bins, with and without holes at the border."""
    out = tmp_path / "masks"
    out.mkdir(exist_ok=True)
    for i, (y, x, h) in enumerate([(20, 20, 10), (0, 0, 12), (10, 10, 28), (0, 30, 34)]):
        m = np.zeros((64, 64), dtype=np.uint8)
        m[y:y + h, x:x + h] = 255
        Image.fromarray(m).save(out / f"m{i}.png")
    return str(out)


# ---------------------------------------------------------------------------------------------
# Streaming changes no number
# ---------------------------------------------------------------------------------------------
def _reference_tables(keys: list[str], decoded: list[np.ndarray], es: inputs.EvalSet, model, batch_size: int):
    """The evaluation as it was before streaming: every image decoded first, the pairs group by group in chunks of
    ``batch_size``, each pair's metrics added in that order."""
    from pconv.core import metrics
    from pconv.inference.baseline import baseline_inpaint
    from pconv.inference.inpaint import inpaint

    assert keys == es.image_keys
    tables = {"model": metrics.BinnedMetrics(), "baseline": metrics.BinnedMetrics()}
    for lo in range(0, len(es.pairs), batch_size):
        chunk = es.pairs[lo:lo + batch_size]
        image = torch.from_numpy(np.stack([decoded[j] for j, _ in chunk]).astype(np.float32) / 255).permute(0, 3, 1, 2)
        mask = torch.from_numpy(np.stack([es.mask(r) for _, r in chunk]).astype(np.float32))[:, None]
        imgs = image.permute(0, 2, 3, 1).numpy()
        preds = {"model": inpaint(model, image.contiguous(), mask, device="cpu", batch_size=batch_size),
                 "baseline": torch.from_numpy(np.stack([baseline_inpaint(imgs[k], mask[k, 0].numpy())
                                                        for k in range(len(chunk))])).permute(0, 3, 1, 2)}
        gt = image.double()
        for name, pred in preds.items():
            pred = pred.double()
            tables[name].add_batch([r.bin for _, r in chunk], [r.border for _, r in chunk],
                                   metrics.l1_percent(pred, gt), metrics.psnr(pred, gt), metrics.ssim(pred, gt))
    return {k: t.as_dict() for k, t in tables.items()}


def test_streamed_numbers_equal_the_decode_everything_first_numbers(tmp_path, datasets_dir):
    from pconv.ingest import ingest_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((datasets_dir / "cbsd68").glob("*.png"))[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    shard_root = str(tmp_path / "shards")
    ingest_images(str(folder), shard_root, val_fraction=0.0, shard_size_mb=0.02, max_side=96, engine="threads",
                  progress=False)
    masks = _masks_folder(tmp_path)
    torch.manual_seed(0)
    model = build_model(4).eval()
    for uri in (str(folder), shard_root):
        keys, decoded = inpainting.load_images(uri, SIZE)
        es = inpainting.build_eval_set(uri, masks, SIZE, hole_color="white")
        assert len(es.pairs) == 16  # 4 images x 4 groups: no short last chunk in the reference (batch 4)
        want = _reference_tables(keys, decoded, es, model, 4)
        by_batch_size = {}
        for batch_size in (4, 3):  # 3: a last chunk of one pair, padded
            for batch_images in (1, 32):  # shards arrive in storage order, files in key order: no difference
                es = inpainting.build_eval_set(uri, masks, SIZE, hole_color="white", batch_images=batch_images)
                fills = {"model": inpainting.model_fill(model, batch_size, "cpu"), "baseline": inpainting.baseline_fill}
                got = {k: t.as_dict() for k, t in inpainting.evaluate_fills(es, fills, batch_size).items()}
                assert got == by_batch_size.setdefault(batch_size, got), (uri, batch_size, batch_images)
        assert by_batch_size[4] == want, uri  # bit-identical to decoding everything first, every cell
    assert len(shards.read_manifest(shard_root)["shards"]) > 1  # the shard case did span several shards


def test_an_unreadable_image_drops_its_pairs_without_shifting_the_others(tmp_path, datasets_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((datasets_dir / "cbsd68").glob("*.png"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "000_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # position 0
    masks = _masks_folder(tmp_path)
    es = inpainting.build_eval_set(str(folder), masks, SIZE, hole_color="white")
    assert es.image_keys[0] == "000_broken.png" and len(es.pairs) == 4 * len(es.groups)
    first = inpainting.evaluate_baseline(es)
    second = inpainting.evaluate_baseline(es)  # a second pass (promotion re-evaluates) lists the file once
    assert first.count == second.count == 3 * len(es.groups) and first.as_dict() == second.as_dict()
    assert len(es.skipped) == 1 and "000_broken.png" in es.skipped[0] and es.failed_images == 1
    # the readable images keep the pairs the set fixed for them (image j with mask j mod len(group))
    clean = tmp_path / "clean"
    clean.mkdir()
    for name in es.image_keys[1:]:
        (clean / name).write_bytes((folder / name).read_bytes())
    (clean / "000_other.png").write_bytes((folder / es.image_keys[1]).read_bytes())
    other = inpainting.build_eval_set(str(clean), masks, SIZE, hole_color="white")
    assert [(j, r.key) for j, r in other.pairs] == [(j, r.key) for j, r in es.pairs]
    with pytest.raises(ValueError, match="none of the 1 images"):
        inpainting.load_images(str(folder), SIZE, limit=1)
