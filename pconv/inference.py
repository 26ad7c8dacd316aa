"""Using a trained PConv U-Net: load it from any model URI, inpaint images of any size, register checkpoints.

Model URIs (:func:`load_model`):

- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a registered model. Only ``extra_files/`` of the logged
  model (plain state dict + config.yaml, see :mod:`pconv.registry`) is downloaded; the net is rebuilt with
  ``build_model`` and the weights load with ``torch.load(weights_only=True)``: no pickle is executed.
- a checkpoint: a local folder or ``s3://`` prefix holding ``state.pt``/``config.yaml``/``meta.json``; a folder
  of several checkpoints (e.g. a run's storage folder) resolves to its latest complete one (highest step).
- a local MLflow model folder (``MLmodel`` + ``extra_files/``).

Inpainting (:func:`inpaint`) returns the composite ``mask * image + (1 - mask) * output``: valid pixels are the
input's, bit for bit. Sizes that are not a multiple of ``2**layer_size`` are padded by REFLECTION (image and mask
alike, so the padded border looks like real context rather than a band of holes, which would enlarge the
hole the net has to explain) and cropped back; images larger than ``max_side`` are processed in overlapping
tiles blended with linear ramps, skipping tiles without holes.
"""

from __future__ import annotations

import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pconv import checkpoint as ckpt
from pconv import storage
from pconv.images import IMAGE_SUFFIXES, open_image
from pconv.masks import MASK_SUFFIXES

log = logging.getLogger(__name__)

DEFAULT_MAX_SIDE = 2048
DEFAULT_TILE_OVERLAP = 128


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _layer_size(cfg: dict[str, Any], source: str) -> tuple[int, int]:
    from pconv.config import default_layer_size

    try:
        image_size = int(cfg["image_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{source}: config.yaml has no usable image_size") from None
    layer_size = cfg.get("layer_size")
    return image_size, int(layer_size) if layer_size is not None else default_layer_size(image_size)


def _build(state_dict: dict[str, torch.Tensor], cfg: dict[str, Any], source: str) -> tuple[torch.nn.Module, dict]:
    from pconv.model import build_model

    image_size, layer_size = _layer_size(cfg, source)
    model = build_model(layer_size)
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ValueError(f"{source}: weights do not fit a layer_size={layer_size} PConvUNet: {exc}") from exc
    return model.eval(), {"image_size": image_size, "layer_size": layer_size, "source": source}


def _load_checkpoint_dir(directory: Path, source: str) -> tuple[torch.nn.Module, dict]:
    state = ckpt.load_state(directory)
    if "model" not in state:
        raise ValueError(f"{source}: state.pt has no 'model' entry")
    model, info = _build(state["model"], ckpt.load_config_dict(directory), source)
    meta = ckpt.load_meta(directory)
    info.update(kind="checkpoint", step=state.get("step", meta.get("step")), mlflow_run_id=meta.get("mlflow_run_id"))
    return model, info


def _load_model_dir(directory: Path, source: str) -> tuple[torch.nn.Module, dict]:
    """An MLflow model folder (or its extra_files/ subfolder) written by :mod:`pconv.registry`."""
    import yaml

    from pconv.registry import CONFIG_FILE, EXTRA_FILES_DIR, STATE_DICT_FILE

    extra = directory / EXTRA_FILES_DIR if (directory / EXTRA_FILES_DIR).is_dir() else directory
    state_path, cfg_path = extra / STATE_DICT_FILE, extra / CONFIG_FILE
    if not state_path.is_file() or not cfg_path.is_file():
        raise FileNotFoundError(f"{source}: no {EXTRA_FILES_DIR}/{STATE_DICT_FILE} + {CONFIG_FILE}; "
                                "was it logged by pconv.registry.log_and_register_model?")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model, info = _build(state, cfg, source)
    info["kind"] = "mlflow-model"
    return model, info


def _latest_checkpoint_uri(uri: str) -> str | None:
    found = ckpt.latest(uri)
    return found[0] if found else None


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri!r} is not a models:/ URI")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    if not name or not version:
        raise ValueError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, version, None


def resolve_version(uri: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """(name, version) of a registry URI, resolving an alias through the registry."""
    from pconv.tracking import client_for

    name, version, alias = parse_registry_uri(uri)
    if alias is not None:
        version = client_for(tracking_uri).get_model_version_by_alias(name, alias).version
    return name, str(version)


def load_model(uri: str, device: str | torch.device = "cpu", tracking_uri: str | None = None
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a PConv U-Net (eval mode) from a registry URI, a checkpoint URI or a local path.

    Returns ``(model, info)``; ``info`` has ``image_size``, ``layer_size``, ``source`` and ``kind``
    (plus ``name``/``version`` for registry URIs, ``step`` for checkpoints).
    """
    uri = str(uri)
    if uri.startswith("models:/"):
        import mlflow

        from pconv.registry import EXTRA_FILES_DIR
        from pconv.tracking import resolve_tracking_uri

        name, version = resolve_version(uri, tracking_uri)
        resolved = resolve_tracking_uri(tracking_uri)
        with tempfile.TemporaryDirectory(prefix="pconv-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}/{EXTRA_FILES_DIR}", dst_path=tmp,
                tracking_uri=resolved, registry_uri=resolved)
            model, info = _load_model_dir(Path(local), uri)
        info.update(kind="registry", name=name, version=version)
    elif storage.is_remote(uri):
        base = uri.rstrip("/")
        if not storage.exists(storage.join(base, ckpt.STATE_FILE)):
            base = _latest_checkpoint_uri(base) or ""
            if not base:
                raise FileNotFoundError(f"{uri}: no complete checkpoint (state.pt + config.yaml + meta.json) there")
        with tempfile.TemporaryDirectory(prefix="pconv-ckpt-") as tmp:
            for name in (ckpt.STATE_FILE, ckpt.CONFIG_FILE, ckpt.META_FILE):
                (Path(tmp) / name).write_bytes(storage.read_bytes(storage.join(base, name)))
            model, info = _load_checkpoint_dir(Path(tmp), base)
    else:
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model {uri}: no such file or directory (expected models:/NAME@ALIAS, a "
                                    "checkpoint folder/s3:// prefix or an MLflow model folder)")
        if path.is_file():
            path = path.parent
        if ckpt.is_complete(path):
            model, info = _load_checkpoint_dir(path, str(path))
        elif (path / "MLmodel").is_file() or (path / "state_dict.pt").is_file():
            model, info = _load_model_dir(path, str(path))
        else:
            latest = _latest_checkpoint_uri(str(path))
            if latest is None:
                raise FileNotFoundError(f"{uri}: neither a checkpoint (state.pt + config.yaml + meta.json), an "
                                        "MLflow model folder, nor a folder holding checkpoints")
            model, info = _load_checkpoint_dir(Path(latest), latest)
    info["uri"] = uri
    return model.to(resolve_device(device)).eval(), info


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu; ``cuda`` without a GPU is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    return dev


# ---------------------------------------------------------------------------------------------
# Inpainting
# ---------------------------------------------------------------------------------------------
def net_multiple(model: torch.nn.Module) -> int:
    """Spatial multiple the U-Net needs (2**layer_size)."""
    layer_size = getattr(ckpt.unwrap(model), "layer_size", None)
    if layer_size is None:
        raise ValueError("cannot tell the model's layer_size; pass multiple= explicitly")
    return 2 ** int(layer_size)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
    if not any(pad):
        return x, pad
    mode = "reflect" if max(pad[0], pad[1]) < w and max(pad[2], pad[3]) < h else "replicate"
    return F.pad(x, pad, mode=mode), pad


@torch.no_grad()
def _forward(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, multiple: int) -> torch.Tensor:
    """Raw network output for N×3×H×W / N×1×H×W at any H, W (pad, run, crop)."""
    h, w = image.shape[-2:]
    # Holes are zeroed with where(), not multiplied: whatever the input holds there (even NaN) cannot leak.
    known = torch.where(mask >= 0.5, image, torch.zeros((), dtype=image.dtype, device=image.device))
    both, pad = _pad_to_multiple(torch.cat([known, mask], dim=1), multiple)
    out, _ = model(both[:, :3], both[:, 3:])
    return out[..., pad[2]:pad[2] + h, pad[0]:pad[0] + w].float()


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    r = torch.ones(length)
    if overlap > 0:
        edge = torch.linspace(1.0 / (overlap + 1), 1.0, overlap)
        if not at_start:
            r[:overlap] = edge
        if not at_end:
            r[-overlap:] = edge.flip(0)
    return r


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


@torch.no_grad()
def _forward_tiled(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, multiple: int, tile: int,
                   overlap: int) -> torch.Tensor:
    """Overlapping tiles (each padded as needed), blended with linear ramps; tiles without holes are skipped."""
    _, _, h, w = image.shape
    out = torch.zeros_like(image, dtype=torch.float32)
    weight = torch.zeros((1, 1, h, w), dtype=torch.float32, device=image.device)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    for y in ys:
        for x in xs:
            th, tw = min(tile, h - y), min(tile, w - x)
            m = mask[..., y:y + th, x:x + tw]
            if bool((m >= 0.5).all()):
                continue
            o = _forward(model, image[..., y:y + th, x:x + tw], m, multiple)
            wy = _ramp(th, min(overlap, th), y == ys[0], y == ys[-1]).to(image.device)
            wx = _ramp(tw, min(overlap, tw), x == xs[0], x == xs[-1]).to(image.device)
            wt = (wy[:, None] * wx[None, :])[None, None]
            out[..., y:y + th, x:x + tw] += o * wt
            weight[..., y:y + th, x:x + tw] += wt
    return out / weight.clamp_min(1e-8)


@torch.no_grad()
def inpaint(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, device: str | torch.device | None = None,
            multiple: int | None = None, max_side: int = DEFAULT_MAX_SIDE,
            tile_overlap: int = DEFAULT_TILE_OVERLAP, batch_size: int = 8) -> torch.Tensor:
    """Fill the holes of ``image`` (3×H×W or N×3×H×W, [0, 1]) where ``mask`` (H×W, 1×H×W or N×1×H×W; 1 = valid,
    binarised at 0.5) is 0. Returns the composite on the input's device, float32, same shape as ``image``:
    valid pixels are exactly the input's, holes come from the network (clamped to [0, 1]).
    """
    squeeze = image.dim() == 3
    img = image.unsqueeze(0) if squeeze else image
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"image must be 3×H×W or N×3×H×W, got {tuple(image.shape)}")
    msk = mask
    while msk.dim() < 4:
        msk = msk.unsqueeze(0)
    if msk.shape[1] != 1 or msk.shape[-2:] != img.shape[-2:] or msk.shape[0] not in (1, img.shape[0]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)} "
                         "(expected N×1×H×W with the image's H and W)")
    msk = msk.expand(img.shape[0], 1, *img.shape[-2:])
    img = img.float()
    valid = msk >= 0.5
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    multiple = multiple or net_multiple(model)
    tile = max(multiple, (max_side // multiple) * multiple)
    overlap = min(tile // 2, max(multiple, (tile_overlap // multiple) * multiple)) if tile_overlap > 0 else 0

    outputs = []
    for i in range(0, img.shape[0], batch_size):
        x, m = img[i:i + batch_size].to(dev), valid[i:i + batch_size].to(dev).float()
        if max(x.shape[-2:]) > max_side:
            o = torch.cat([_forward_tiled(model, x[j:j + 1], m[j:j + 1], multiple, tile, overlap)
                           for j in range(x.shape[0])])
        else:
            o = _forward(model, x, m, multiple)
        outputs.append(o.clamp(0, 1).to(img.device))
    out = torch.cat(outputs)
    comp = torch.where(valid, img, out)
    return comp[0] if squeeze else comp


# ---------------------------------------------------------------------------------------------
# Files and folders
# ---------------------------------------------------------------------------------------------
def read_image(uri: str) -> torch.Tensor:
    """An image file (local or s3) as float32 3×H×W in [0, 1] (EXIF orientation applied; any mode -> RGB)."""
    arr = np.asarray(open_image(storage.read_bytes(uri), name=uri), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def read_mask(uri: str, hole_color: str, threshold: float = 0.5) -> torch.Tensor:
    """A mask file in the stated polarity as float32 1×H×W, 1 = valid."""
    from pconv.masks import decode_mask

    return torch.from_numpy(decode_mask(storage.read_bytes(uri), hole_color, threshold, name=uri)).float()[None]


def encode_image(image: torch.Tensor, suffix: str = ".png") -> bytes:
    """3×H×W float in [0, 1] -> PNG (or JPEG for .jpg/.jpeg) bytes, rounded to 8 bit."""
    from PIL import Image

    arr = (image.detach().cpu().clamp(0, 1).numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    if suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _is_dir(uri: str) -> bool:
    if storage.is_remote(uri):
        return uri.endswith("/") or (not Path(uri).suffix and bool(storage.list_files(uri)))
    return Path(uri).expanduser().is_dir()


def _stem_map(files: list[str], base: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    base = base.rstrip("/")
    for f in files:
        rel = f[len(base):].lstrip("/") if f.startswith(base) else Path(f).name
        stem = str(Path(rel).with_suffix(""))
        if stem in out:
            raise ValueError(f"{what}: two files share the stem {stem!r}: {out[stem]} and {f}")
        out[stem] = f
    return out


@dataclass
class Job:
    """One (image, mask, output) triple."""

    image: str
    mask: str
    out: str


def pair_files(image_uri: str, mask_uri: str, out_uri: str) -> list[Job]:
    """Single files, or folders paired by relative path without suffix; unmatched files are an error."""
    if not _is_dir(image_uri):
        if _is_dir(mask_uri):
            raise ValueError(f"--image {image_uri} is a file but --mask {mask_uri} is a folder; give both as "
                             "files or both as folders")
        out = out_uri
        if _is_dir(out_uri) or out_uri.endswith("/"):
            out = storage.join(out_uri, Path(image_uri).stem + ".png")
        return [Job(image_uri, mask_uri, out)]
    if not _is_dir(mask_uri):
        raise ValueError(f"--image {image_uri} is a folder, so --mask must be a folder too (got {mask_uri})")
    images = _stem_map(storage.list_files(image_uri, IMAGE_SUFFIXES), image_uri, "images")
    masks = _stem_map(storage.list_files(mask_uri, MASK_SUFFIXES), mask_uri, "masks")
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {image_uri}")
    no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} image(s) without a mask: {', '.join(no_mask[:10])}")
        if no_image:
            parts.append(f"{len(no_image)} mask(s) without an image: {', '.join(no_image[:10])}")
        raise ValueError(f"cannot pair {image_uri} with {mask_uri} by file name: " + "; ".join(parts))
    return [Job(images[s], masks[s], storage.join(out_uri, s + ".png")) for s in sorted(images)]


def inpaint_job(model: torch.nn.Module, job: Job, hole_color: str, threshold: float = 0.5,
                device: str | torch.device | None = None, max_side: int = DEFAULT_MAX_SIDE) -> dict[str, Any]:
    """Read, inpaint, write one triple; returns a summary row (sizes, hole ratio)."""
    image = read_image(job.image)
    mask = read_mask(job.mask, hole_color, threshold)
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask {job.mask} is {mask.shape[-1]}x{mask.shape[-2]} but image {job.image} is "
                         f"{image.shape[-1]}x{image.shape[-2]} (width x height); masks must match their image")
    comp = inpaint(model, image, mask, device=device, max_side=max_side)
    if not storage.is_remote(job.out):
        Path(job.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(job.out, encode_image(comp, Path(job.out).suffix or ".png"))
    return {"image": job.image, "mask": job.mask, "out": job.out, "height": int(image.shape[-2]),
            "width": int(image.shape[-1]), "hole_ratio": float((mask < 0.5).float().mean())}


def inpaint_files(model_uri: str, image: str, mask: str, out: str, hole_color: str, threshold: float = 0.5,
                  device: str = "auto", max_side: int = DEFAULT_MAX_SIDE,
                  tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """What ``pipelines/inpaint.py`` does: load the model once, then inpaint each paired file."""
    jobs = pair_files(image, mask, out)  # pairing errors before the (slow) model load
    model, info = load_model(model_uri, device=resolve_device(device), tracking_uri=tracking_uri)
    log.info("loaded %s (%s, layer_size %d, trained at %d px)", model_uri, info["kind"], info["layer_size"],
             info["image_size"])
    return [inpaint_job(model, job, hole_color, threshold, max_side=max_side) for job in jobs]


# ---------------------------------------------------------------------------------------------
# Registering a checkpoint
# ---------------------------------------------------------------------------------------------
def register_checkpoint(checkpoint_uri: str, name: str = "pconv-unet", alias: str = "candidate",
                        experiment: str | None = None, run_id: str | None = None,
                        tracking_uri: str | None = None) -> str | None:
    """Log a checkpoint's model to MLflow and register it (what ``pipelines/register.py`` does).

    The MLflow run is ``run_id``, else the one recorded in the checkpoint's meta.json, else the run named after
    the checkpoint's ``run_name`` in ``experiment`` (created if needed). The run's status is left as it is.
    """
    from pconv.config import TrainConfig
    from pconv.registry import log_and_register_model
    from pconv.tracking import start_or_resume_run

    model, info = load_model(checkpoint_uri)
    if info["kind"] != "checkpoint":
        raise ValueError(f"{checkpoint_uri} is not a checkpoint (it is a {info['kind']}); register.py takes a "
                         "checkpoint folder or s3:// prefix")
    local_cfg = _checkpoint_config(info["source"])
    cfg = TrainConfig.from_dict(local_cfg, source=f"{info['source']}/config.yaml").resolved()
    rid = start_or_resume_run(experiment or cfg.experiment, cfg.run_name, run_id=run_id or info.get("mlflow_run_id"),
                              tracking_uri=tracking_uri, mark_running=False)
    if rid is None:
        raise RuntimeError("the MLflow tracking server is unreachable; nothing was registered")
    return log_and_register_model(model, cfg, rid, name=name, alias=alias, tracking_uri=tracking_uri,
                                  step=info.get("step"), checkpoint_uri=info["source"])


def _checkpoint_config(source: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(storage.read_bytes(storage.join(source, ckpt.CONFIG_FILE))) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}/{ckpt.CONFIG_FILE} is not a mapping")
    return data


__all__ = ["Job", "inpaint", "inpaint_files", "inpaint_job", "load_model", "net_multiple", "pair_files",
           "parse_registry_uri", "read_image", "read_mask", "register_checkpoint", "resolve_device",
           "resolve_version", "encode_image"]
