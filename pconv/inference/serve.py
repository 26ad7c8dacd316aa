"""The Ray Serve application: the HTTP API and the web page for inpainting with a registered (or any) model.

Two deployments: :class:`InpaintServer` (``PConvInpaint``), the FastAPI ingress (routes, form parsing, input checks:
no model, no GPU), and :class:`PConvModel` (``PConvModel``), the model replicas (batching, alias following, the
forward pass), which the ingress calls through a deployment handle. Routes:

- ``POST /inpaint``: multipart form with files ``image`` and ``mask`` and optional field ``hole_color`` (``white``
  default, or ``black``) -> ``image/png``, the composite at the image's size; header ``X-Model-Version`` names the
  version that answered. Bad input gets a 4xx JSON ``{"error": ...}`` naming the problem (checks shared with the
  MLflow pyfunc, :func:`pconv.inference.pyfunc.decode_request`); the replica keeps serving.
- ``POST /super-resolve`` (a super-resolution model, ``task: sr``): multipart file ``image`` (the LR image) ->
  ``image/png``, K times larger with the LR pixels exact at their grid positions. Each endpoint answers 409 with a
  JSON error naming the other when the served model is of the other task.
- ``GET /``: the page (``serve_page.html``: paint holes on a photo, inpaint, compare, download).
- ``GET /healthz``: ``{"status": "ok", "model": ..., "version": ...}``.
- ``GET /docs``: the OpenAPI (Swagger) page, with the upload fields of both POST routes declared.

Requests are batched on the model replica with ``@serve.batch`` (same-size images run as one forward pass). Queues are
bounded: each model replica takes ``max_ongoing_requests`` at a time and at most ``max_queued_requests`` more wait
for one (in each ingress replica, and in each proxy for the ingress); beyond that the answer is 503 at once, with a
``Retry-After`` header, instead of letting clients hang. Model replicas take a GPU when the cluster has one, and
autoscale between ``min_replicas`` and ``max_replicas`` on ongoing requests.

Why two deployments: when a model replica dies (killed, out of memory, a GPU fault), the requests it was working on
fail in whoever called it. With the routes in the model replica that caller is Ray's HTTP proxy, which answers 500
(or nothing). With a separate ingress, the caller is :class:`InpaintServer`, which answers **503 with Retry-After**
for them, and for requests that find no replica until Serve has started a new one (``health_check_s`` after the
death at most, then the model load). Bad input is refused by the ingress before it takes a model replica's slot.

Alias following: for ``models:/NAME@ALIAS`` each replica polls the registry every ``poll_s`` seconds; when the alias
moves, the new version is loaded beside the old one and swapped in between batches, so no request is dropped.
"""

import asyncio
import logging
import math
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from pconv import cluster
from pconv.core.config import INPAINTING_TASK, SR_TASK
from pconv.inference.inpaint import encode_image
from pconv.inference.pyfunc import (DEFAULT_MAX_PIXELS, BadInput, Decoded, PackedDecoded, decode_lr_request,
                                    decode_request, inpaint_decoded)
from pconv.inference.super_resolve import resolve_scale, super_resolve
from pconv.tracking.loading import REGISTRY_SCHEME, load_model, parse_registry_uri, resolve_version

log = logging.getLogger(__name__)

APP_NAME = "pconv"
PAGE_FILE = Path(__file__).with_name("serve_page.html")
VERSION_HEADER = "X-Model-Version"
WARNING_HEADER = "X-Mask-Warning"  # e.g. a mask that is probably inverted (masks.polarity_warning)
DEFAULTS: dict[str, Any] = {
    "poll_s": 10.0,              # how often a replica checks where the alias points
    "max_pixels": DEFAULT_MAX_PIXELS,
    "max_batch_size": 8,         # @serve.batch: requests per forward pass (1 = batching off)
    "batch_wait_s": 0.01,        # @serve.batch: how long a batch waits to fill up
    "device": "auto",
    "retry_after_s": 1.0,        # the Retry-After of a 503 (full queues, or no live model replica)
}
INGRESS_OPTIONS = frozenset({"max_pixels", "retry_after_s"})  # the rest of DEFAULTS are PConvModel's
# What a model replica's death (or its absence, or its full queue) looks like to the ingress: 503, not 500.
MODEL_UNAVAILABLE: tuple[type[BaseException], ...] = (RayActorError, BackPressureError, DeploymentUnavailableError,
                                                      ReplicaUnavailableError)

app = FastAPI(title="PConv inpainting",
              description="Partial-convolution inpainting (Liu et al., ECCV 2018) and its super-resolution variant. "
                          "Masks: white = hole by default (hole_color=black for the other way round).",
              docs_url="/docs", redoc_url=None)


def _multipart(fields: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    """OpenAPI of a multipart form (the routes read it themselves, for clear 4xx errors; this documents it)."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": fields, "required": required}}}}}


_PNG = {200: {"description": "the result as a PNG", "content": {"image/png": {}}},
        400: {"description": "a missing or undecodable file"}, 409: {"description": "a model of the other task"},
        413: {"description": "an image above the pixel limit"}, 415: {"description": "not multipart/form-data"}}
_FILE = {"type": "string", "format": "binary"}
INPAINT_FORM = _multipart({"image": {**_FILE, "description": "the photo (PNG, JPEG, ...)"},
                           "mask": {**_FILE, "description": "the mask, same size as the photo"},
                           "hole_color": {"type": "string", "enum": ["white", "black"], "default": "white",
                                          "description": "which colour marks the holes in the mask"}},
                          ["image", "mask"])
SUPER_RESOLVE_FORM = _multipart({"image": {**_FILE, "description": "the low-resolution image"}}, ["image"])


async def _read_form(request: Request, files: tuple[str, ...] = ("image", "mask")) -> dict[str, Any]:
    """The multipart form's ``files`` (bytes) and ``hole_color`` (text); BadInput when absent."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise BadInput(f"send multipart/form-data with files {' and '.join(files)} (got content-type "
                       f"{kind or 'none'!r})", status=415)
    try:
        form = await request.form()
    except Exception as exc:  # noqa: BLE001 - a malformed body is the client's problem
        raise BadInput(f"cannot parse the multipart form: {exc}") from exc
    fields: dict[str, Any] = {}
    for name in files:
        value = form.get(name)
        if value is None or isinstance(value, str):
            raise BadInput(f"missing file field {name!r}: send the {name} as a file part of the form")
        fields[name] = await value.read()
    color = form.get("hole_color")
    fields["hole_color"] = color if isinstance(color, str) else None
    return fields


@serve.deployment(name="PConvModel")
class PConvModel:
    """One model replica: the model (swapped when the alias moves), the batcher and the forward pass; called by
    :class:`InpaintServer` through a deployment handle, never over HTTP."""

    def __init__(self, model_uri: str, tracking_uri: str | None = None, **options: Any):
        unknown = set(options) - (set(DEFAULTS) - INGRESS_OPTIONS)
        if unknown:
            raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(set(DEFAULTS))}")
        self.opts = {**DEFAULTS, **options}
        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        self._lock = threading.Lock()
        self._current = self._load(self._resolved_uri())
        self._batched.set_max_batch_size(int(self.opts["max_batch_size"]))
        self._batched.set_batch_wait_timeout_s(float(self.opts["batch_wait_s"]))
        self._stop = threading.Event()
        if self._follows_alias() and float(self.opts["poll_s"]) > 0:
            threading.Thread(target=self._follow, name="pconv-alias-poll", daemon=True).start()

    # ---- model and alias ----------------------------------------------------------------------------------
    def _follows_alias(self) -> bool:
        return self.model_uri.startswith(REGISTRY_SCHEME) and parse_registry_uri(self.model_uri)[2] is not None

    def _resolved_uri(self) -> str:
        """An alias URI pinned to the version it points at now (so the loaded version is the one reported)."""
        if not self._follows_alias():
            return self.model_uri
        name, version = resolve_version(self.model_uri, self.tracking_uri)
        return f"{REGISTRY_SCHEME}{name}/{version}"

    def _load(self, uri: str) -> tuple[Any, str]:
        model, info = load_model(uri, device=self.opts["device"], tracking_uri=self.tracking_uri)
        self.task = info.task  # inpainting or sr: which POST route answers
        self.scale = resolve_scale(info, None) if self.task == SR_TASK else None
        version = info.label
        log.info("serving %s (version %s) on %s", self.model_uri, version, next(model.parameters()).device)
        return model, version

    def _follow(self) -> None:
        """Poll the registry; load a moved alias's version beside the old one, then swap (in-flight batches keep
        the model they started with)."""
        while not self._stop.wait(float(self.opts["poll_s"])):
            try:
                uri = self._resolved_uri()
                if uri.rsplit("/", 1)[-1] == self._current[1]:
                    continue
                loaded = self._load(uri)
                with self._lock:
                    old, self._current = self._current[1], loaded
                log.info("%s moved: version %s -> %s", self.model_uri, old, loaded[1])
            except Exception:  # noqa: BLE001 - a registry hiccup must not stop serving the current version
                log.exception("checking %s failed; still serving version %s", self.model_uri, self._current[1])

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def describe(self) -> dict[str, Any]:
        """What the ingress needs to route and check a request: the URI, the version serving now, task and scale."""
        return {"model": self.model_uri, "version": self._current[1], "task": self.task, "scale": self.scale}

    # ---- batching and the forward pass --------------------------------------------------------------------
    @serve.batch(max_batch_size=DEFAULTS["max_batch_size"], batch_wait_timeout_s=DEFAULTS["batch_wait_s"])
    async def _batched(self, items: list[Decoded]) -> list[tuple[bytes, str]]:
        with self._lock:
            model, version = self._current

        def run() -> list[tuple[bytes, str]]:
            return [(encode_image(c), version) for c in inpaint_decoded(model, items)]

        return await asyncio.to_thread(run)

    async def inpaint(self, packed: PackedDecoded) -> tuple[bytes, str]:
        """The composite of one checked request (sent as uint8) as PNG bytes, and the version that made it
        (batched)."""
        return await self._batched(packed.unpack())

    async def super_resolve(self, lr: Any) -> tuple[bytes, str]:
        """The K-times larger image of one checked LR image as PNG bytes, and the version that made it."""
        with self._lock:
            model, version = self._current
        png = await asyncio.to_thread(lambda: encode_image(super_resolve(model, lr, self.scale)))
        return png, version


@serve.deployment(name="PConvInpaint")
@serve.ingress(app)
class InpaintServer:
    """The HTTP ingress: routes, form parsing and input checks (4xx), and the call to a model replica, whose death
    or absence it answers with 503 + Retry-After (Ray's proxy would answer 500 for a request in flight there)."""

    def __init__(self, model: DeploymentHandle, max_pixels: int = DEFAULT_MAX_PIXELS,
                 retry_after_s: float = DEFAULTS["retry_after_s"]):
        self.model, self.max_pixels, self.retry_after_s = model, int(max_pixels), float(retry_after_s)
        self._info: dict[str, Any] | None = None

    async def _describe(self, fresh: bool = False) -> dict[str, Any]:
        """The model's description, asked once (task and scale are fixed by the URI's registered model); ``fresh``
        asks again, for the version serving now."""
        if fresh or self._info is None:
            self._info = await self.model.describe.remote()
        return self._info

    def _unavailable(self, exc: BaseException) -> JSONResponse:
        """503 + Retry-After for a request no model replica could take or finish (full queues, a replica that died
        under it, none started yet): the client may retry, unlike after a 500."""
        log.warning("model unavailable, answering 503: %s: %s", type(exc).__name__, exc)
        return JSONResponse({"error": f"the model is unavailable right now ({type(exc).__name__}); retry later"},
                            status_code=503, headers={"Retry-After": str(max(1, math.ceil(self.retry_after_s)))})

    # ---- routes -------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE_FILE.read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz(self) -> Response:
        try:
            info = await self._describe(fresh=True)
        except MODEL_UNAVAILABLE as exc:
            return self._unavailable(exc)
        return JSONResponse({"status": "ok", "model": info["model"], "version": info["version"],
                             "task": info["task"]})

    @staticmethod
    def _wrong_task(info: dict[str, Any], task: str) -> JSONResponse | None:
        if (info["task"] == SR_TASK) == (task == SR_TASK):
            return None
        what = f"a super-resolution model (x{info['scale']}): POST /super-resolve with the file image" \
            if info["task"] == SR_TASK else "an inpainting model: POST /inpaint with the files image and mask"
        return JSONResponse({"error": f"this server serves {info['model']}, {what}"}, status_code=409)

    @app.post("/super-resolve", openapi_extra=SUPER_RESOLVE_FORM, response_class=Response, responses=_PNG,
              summary="A K-times larger image (super-resolution models)")
    async def super_resolve_route(self, request: Request) -> Response:
        try:
            info = await self._describe()
            if (wrong := self._wrong_task(info, SR_TASK)) is not None:
                return wrong
            try:
                fields = await _read_form(request, ("image",))
                lr = await asyncio.to_thread(decode_lr_request, fields["image"], info["scale"], self.max_pixels)
            except BadInput as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
            png, version = await self.model.super_resolve.remote(lr)
        except MODEL_UNAVAILABLE as exc:
            return self._unavailable(exc)
        return Response(png, media_type="image/png", headers={VERSION_HEADER: version})

    @app.post("/inpaint", openapi_extra=INPAINT_FORM, response_class=Response,
              responses={**_PNG, 422: {"description": "an unusable mask"}}, summary="Fill the holes of a photo")
    async def inpaint(self, request: Request) -> Response:
        try:
            if (wrong := self._wrong_task(await self._describe(), INPAINTING_TASK)) is not None:
                return wrong
            try:
                fields = await _read_form(request)
                decoded = await asyncio.to_thread(decode_request, fields["image"], fields["mask"],
                                                  fields.get("hole_color"), self.max_pixels)
            except BadInput as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
            png, version = await self.model.inpaint.remote(decoded.pack())  # uint8 over the hop: 1/4 the bytes
        except MODEL_UNAVAILABLE as exc:
            return self._unavailable(exc)
        headers = {VERSION_HEADER: version}
        if decoded.warning:
            headers[WARNING_HEADER] = decoded.warning
        return Response(png, media_type="image/png", headers=headers)


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has or its autoscaler can launch (:mod:`pconv.cluster`; 0 when Ray is not
    initialised): a cluster that starts without GPU nodes still gets GPU replicas, launched for them."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(cluster.reachable_or_now(cluster.read_view(), "GPU"))


def build_app(model_uri: str, tracking_uri: str | None = None, min_replicas: int = 1, max_replicas: int = 2,
              max_ongoing_requests: int = 8, max_queued_requests: int = 16, num_cpus: float = 1.0,
              num_gpus: float | None = None, health_check_s: float = 2.0, ingress_replicas: int = 1,
              **options: Any) -> serve.Application:
    """The bound application: ``ingress_replicas`` ingress replicas (no CPU reserved: they parse forms and wait)
    in front of ``min_replicas``..``max_replicas`` model replicas of ``num_cpus`` / ``num_gpus`` each
    (``num_gpus=None``: one GPU per replica when the cluster has or can launch GPUs). Serve checks each model
    replica every ``health_check_s`` seconds (its default, 10 s, would leave a dead replica unreplaced that long)."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown serve option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    if num_gpus is None:
        num_gpus = 1.0 if cluster_gpus() > 0 else 0.0
    retry = BackpressureConfig(retry_after_s=float(options.get("retry_after_s", DEFAULTS["retry_after_s"])))
    model = PConvModel.options(
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
        backpressure_config=retry, health_check_period_s=health_check_s,
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": max(1, max_ongoing_requests // 2)})
    # The ingress holds every request the model replicas can hold (working + queued), so the model's bounds are
    # the ones that refuse; its own proxy queue is the same size.
    ingress = InpaintServer.options(
        num_replicas=ingress_replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max_replicas * max_ongoing_requests + max_queued_requests,
        max_queued_requests=max_queued_requests, backpressure_config=retry)
    model_options = {k: v for k, v in options.items() if k not in INGRESS_OPTIONS}
    return ingress.bind(model.bind(model_uri, tracking_uri, **model_options),
                        **{k: v for k, v in options.items() if k in INGRESS_OPTIONS})


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``import_path: pconv.inference.serve:app_builder`` for ``serve deploy`` (infra/serve/): ``args`` are build_app's
    keyword arguments (``model_uri`` required)."""
    args = dict(args)
    if "model_uri" not in args:
        raise ValueError("serve config: args.model_uri is required (e.g. models:/pconv-unet@champion)")
    ints = {"min_replicas", "max_replicas", "max_ongoing_requests", "max_queued_requests", "max_pixels",
            "max_batch_size", "ingress_replicas"}
    floats = {"num_cpus", "num_gpus", "poll_s", "batch_wait_s", "retry_after_s", "health_check_s"}
    for key in list(args):
        if key in ints:
            args[key] = int(args[key])
        elif key in floats and args[key] is not None:
            args[key] = float(args[key])
    return build_app(args.pop("model_uri"), **args)


def run(model_uri: str, host: str = "127.0.0.1", port: int = 8000, tracking_uri: str | None = None,
        blocking: bool = True, **kwargs: Any):
    """Start Serve (on the current Ray cluster, or a local one) with HTTP on ``host:port`` and deploy the app;
    returns the app handle when ``blocking`` is False."""
    cluster.connect()
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(model_uri, tracking_uri, **kwargs), name=APP_NAME, route_prefix="/")
    log.info("serving %s at http://%s:%d/ (POST /inpaint, GET /healthz)", model_uri, host, port)
    if not blocking:
        return handle
    threading.Event().wait()  # until interrupted
    return handle


__all__ = ["APP_NAME", "DEFAULTS", "INGRESS_OPTIONS", "MODEL_UNAVAILABLE", "VERSION_HEADER", "InpaintServer",
           "PConvModel", "app", "app_builder", "build_app", "cluster_gpus", "run"]
