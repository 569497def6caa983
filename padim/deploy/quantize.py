"""INT8 exports (``--precision int8``): the backbone of a model's OpenVINO graph quantised by NNCF
(post-training quantisation), calibrated on the model's own training images, and the conformal
thresholds recomputed with that graph on the model's held-out good images.

Why the thresholds are recomputed: int8 scores are not the f32 scores (a few percent apart), and
the split-conformal guarantee holds for the scores the threshold was computed from. So an int8
export carries its own thresholds and calibration scores, computed from *int8* scores of the same
held-out images the fit calibrated on (the seeded split of the training folder is reproducible:
``settings.calibration.split_indices`` with ``calibration_size``, as ``core.fitting.fit_model``), and
its header says so (``thresholds_from``: "int8 graph, 20 held-out images"). It never decides with
a model file's f32 thresholds (``padim.deploy.sessions`` and ``exported`` refuse the pairing).

What is quantised: the backbone's convolutions (int8 weights per output channel, activations per
tensor; NNCF's MIXED preset). What stays f32 (NNCF's ignored scope): every node outside the
backbone's module scope in the traced graph: the channel selection / projection convolutions, the
per-patch Mahalanobis products and the upsampling + blur matrices. Checked after quantisation.
The Gaussians are refitted on the int8 features of the fit's own images (``refit_gaussians``):
int8 features are shifted from f32 ones, and Gaussians fitted on f32 features score them worse.
Neither the quantisation nor the refit sees a held-out image, so the conformal guarantee holds.

Needs ``nncf`` and ``openvino``; the resulting export runs torch-free like any other.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from padim.files.digests import file_sha256
from padim.settings import calibration as cal
from padim.errors import PadimError
from padim.files.headers import CALIBRATION_HASHES_KEY
from padim.files.images import load_pixels, prefetched
from padim.deploy.export import ExportError, calibration_record
from padim.deploy.export_folder import GRAPH_FILES
from padim.deploy.sessions import open_session

QUANTIZATION_IMAGES = 300  # training images NNCF calibrates its ranges on, at most (its own default subset)
SCORING_BATCH = 8  # held-out images per int8 batch (OpenVINO's kernels, chosen by shape, move the last bits with it)
NNCF_INSTALL_HINT = 'pip install nncf openvino (or: pip install "padim-inspect[int8]")'
PRECISION_KEY, QUANTIZATION_KEY = "precision", "quantization"  # padim.json's fields of an int8 export


INT8_REVISION = "int8-refit-1"  # how int8 exports are made: a new revision makes cached ones stale


def int8_graph_key(key: str) -> str:
    """The graph key of a model's int8 export: not its f32 graph's, so that no reader (an older padim
    included) takes an int8 export for the graph of the model file's f32 thresholds."""
    return hashlib.sha256(f"{INT8_REVISION}:{key}".encode()).hexdigest()


def images_digest(images: Sequence, hashes: Optional[Sequence[str]] = None) -> str:
    """SHA-256 over the bytes of ``images`` in order: which training folder calibrated an export.
    hashes: each image's ``file_sha256``, when already computed."""
    digest = hashlib.sha256(str(len(images)).encode())
    for image, sha in zip(images, hashes if hashes is not None else [None] * len(images)):
        digest.update((sha or file_sha256(image)).encode())
    return digest.hexdigest()


def held_out_split(metadata: dict, images: Sequence, hashes: Optional[Sequence[str]] = None) -> Tuple[list, list]:
    """(the fit's images, its held-out calibration images) of the training folder ``images`` (sorted,
    as ``data.mvtec.find_category`` lists them), as the model's own fit split them. The held-out
    images are found by their content (the SHA-256 of their bytes, ``hashes``: computed here when not
    given) against those the model file records (``CALIBRATION_HASHES_KEY``, written by the fit), in
    the fit's order. Refuses, in one line and before any work: a folder that is not the one the
    model was fitted on (other counts, or one of the held-out images missing), models without a
    hold-out (cross-fitted), and models that record no hashes (older files, or fitted from pixels
    in memory: refit them from image files)."""
    images = list(images)
    n_fit, n_held = metadata.get("n_train_images"), metadata.get("n_calibration_images") or 0
    if metadata.get("calibration_method") == "cv":
        raise PadimError("`precision` int8 recomputes the thresholds on the model's held-out images; this model was "
                         "cross-fitted (calibration cv) and holds none out: refit it with calibration holdout")
    if metadata.get("stale_images"):
        raise PadimError(f"`precision` int8 recomputes the thresholds on the model's held-out images; "
                         f"{metadata['stale_images']} good images were added to this model (padim update) after its "
                         "calibration, so none are held out from its Gaussians: refit it to export it to int8")
    if metadata.get("calibrated_by") not in (None, "fit"):
        raise PadimError(f"`precision` int8 recomputes the thresholds on the model's held-out training images; this "
                         f"model's thresholds come from a recalibration ({metadata['calibrated_by']}, "
                         f"{metadata.get('calibration_date')}) on other pictures: export the model file as it was "
                         "fitted to int8, or export this one in f32")
    fraction = metadata.get("calibration_fraction")  # None in files whose estimator did not store it
    expected = n_held if fraction is None else cal.calibration_size(len(images), float(fraction))
    if len(images) != (n_fit or 0) + n_held or expected != n_held:
        raise PadimError(f"`data_root`/`category`: its {len(images)} training images are not the ones the model was "
                         f"fitted on ({n_fit} fitted + {n_held} held out); int8 thresholds need the same held-out "
                         "images")
    if not n_held:
        fit, _ = cal.split_indices(len(images), 0, int(metadata["config"]["seed"]))
        return [images[i] for i in fit], []
    recorded = metadata.get(CALIBRATION_HASHES_KEY)
    if not isinstance(recorded, list) or len(recorded) != n_held:
        raise PadimError(f"`precision` int8: the model file records no SHA-256 of its {n_held} held-out calibration "
                         "images (fitted by an older padim, or from pixels in memory), so nothing proves which images "
                         "would calibrate the int8 thresholds: refit it from the image files")
    hashes = [file_sha256(image) for image in images] if hashes is None else list(hashes)
    where: dict = {}
    for index, sha in enumerate(hashes):
        where.setdefault(sha, []).append(index)
    held = [where[sha].pop(0) for sha in recorded if where.get(sha)]
    if len(held) != n_held:
        raise PadimError(f"`data_root`/`category`: {n_held - len(held)} of the model's {n_held} held-out calibration "
                         "images are not in it (found by their SHA-256): not the folder the model was fitted on; int8 "
                         "thresholds need the model's own held-out images")
    chosen = set(held)
    return [image for i, image in enumerate(images) if i not in chosen], [images[i] for i in held]


def _nncf():
    try:
        import nncf
        import openvino  # noqa: F401
    except ImportError:
        raise ExportError(f"`precision` int8 needs the packages nncf and openvino: {NNCF_INSTALL_HINT}") from None
    return nncf


def _scopes(node) -> List[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return list(ast.literal_eval(prop.value))
    return []


def outside_backbone(onnx_path: Path) -> List[str]:
    """The names (nodes and their outputs) of every node of an exported graph that is not in the
    backbone's module scope (``extractor``): what NNCF must leave in f32."""
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    inside = [any(s == "extractor" or s.endswith(".extractor") for s in _scopes(n)) for n in nodes]
    if not any(inside[i] and n.op_type == "Conv" for i, n in enumerate(nodes)):
        raise ExportError("cannot tell the backbone's nodes in the exported graph (no module scopes): "
                          "`precision` int8 needs torch.onnx's dynamo exporter")
    return sorted({name for n, keep in zip(nodes, inside) if not keep for name in [n.name, *n.output]})


def _check_quantized(model, ignored: Sequence[str]) -> int:
    """Every product after the backbone still reads f32 (no FakeQuantize before it); returns the
    number of quantised convolutions (refused if none)."""
    ignored, backbone, fake_quantize = set(ignored), 0, 0
    for op in model.get_ordered_ops():
        fake_quantize += op.get_type_name() == "FakeQuantize"
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):  # depthwise: GroupConvolution
            continue
        sources = [i.get_source_output().get_node().get_type_name() for i in op.inputs()]
        if op.get_friendly_name() in ignored and "FakeQuantize" in sources:
            raise ExportError(f"NNCF quantised {op.get_friendly_name()}, which must stay f32")
        backbone += op.get_friendly_name() not in ignored
    if not fake_quantize or not backbone:
        raise ExportError("NNCF quantised no convolution of the backbone")
    return backbone


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF's per-node INFO lines are not the user's: its own logger at WARNING while it runs, then
    restored (nothing else of the process is touched)."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def decoded(images: Sequence, config, workers: int = 2) -> List[np.ndarray]:
    """(H, W, 3) uint8 pixels of ``images`` (``load_pixels``; a training image that cannot be read raises)."""
    return [pixels for batch in prefetched(list(images), 16, lambda image: load_pixels(image, config)[0], workers, 0)
            for pixels in batch]


def quantized_model(onnx_path: Path, pixels: Sequence[np.ndarray]):
    """The ONNX graph at ``onnx_path`` as an OpenVINO model with its backbone quantised on ``pixels``
    (the rest f32, checked) -> (the model, what was done: padim.json's ``quantization``)."""
    nncf = _nncf()
    import openvino as ov

    ignored = outside_backbone(onnx_path)
    dataset = nncf.Dataset([p[None] for p in pixels])  # one image per item: NNCF's statistics are per sample
    with _quiet_nncf():
        quantised = nncf.quantize(ov.convert_model(str(onnx_path)), dataset, subset_size=len(pixels),
                                  preset=nncf.QuantizationPreset.MIXED,
                                  ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    n_convolutions = _check_quantized(quantised, ignored)
    return quantised, {
        "tool": f"nncf {nncf.__version__}, openvino {ov.__version__}", "preset": "mixed",
        "quantized": f"{n_convolutions} backbone convolutions (int8 weights per channel, activations per tensor)",
        "kept_f32": "channel selection/projection, Mahalanobis products, upsampling + blur"}


def refit_gaussians(model, fit_images: Sequence, pixels: Sequence[np.ndarray], work: Path):
    """The model's Gaussians refitted on int8 features: its graph, traced with the embeddings as a
    third output and quantised on ``pixels`` as the shipped graph will be (the same backbone, the
    same images: the same ranges), run on every fit image; the statistics finalised as the fit's
    (covariance, epsilon, factor dtype). Why: Gaussians fitted on f32 features see int8 features as
    shifted (measured on Magnetic Tile, efficientnet_lite0: image AUROC 0.920 f32, 0.892 int8 with
    the f32 Gaussians, 0.918 with refitted ones). -> mean (P, d), factor (P, d, d), float32."""
    import openvino as ov
    import torch

    from padim.core.gaussian import GaussianAccumulator, store_factor, unpack_lower
    from padim.deploy.export import export_onnx
    from padim.deploy.sessions import openvino_config

    config = model.config_
    onnx_path = export_onnx(model.scorer_, work / "deltas.onnx", deltas=True)[0]
    quantised, _ = quantized_model(onnx_path, pixels)
    request = ov.Core().compile_model(quantised, "CPU", openvino_config("int8")).create_infer_request()
    mean = model.mean_.detach().cpu().numpy()[:, None, :]  # (P, 1, d)
    stats = GaussianAccumulator()
    for batch in prefetched(list(fit_images), 16, lambda image: load_pixels(image, config)[0], 2, 0):
        outputs = {port.get_any_name(): value for port, value in request.infer({0: np.stack(batch)}).items()}
        embeddings = np.array(outputs["deltas"]) + mean  # (P, B, d)
        stats.update(torch.from_numpy(embeddings).transpose(0, 1).contiguous())
    mean8, packed = stats.finalize(config.epsilon, covariance=config.covariance)
    packed = store_factor(packed, config.factor_dtype)
    return mean8.float(), unpack_lower(packed, mean8.shape[1], torch.float32)


def with_gaussians(model, mean, factor):
    """The model's own ``PatchScorer`` (the same backbone, channels, tiles and ignore mask: what the
    f32 graph computes) with other Gaussians: mean (P, d), factor (P, d, d)."""
    from padim.core.scorer import PatchScorer

    return PatchScorer(model.embedder_, mean, factor, model.feature_hw_, model.config_.sigma).eval()


def score_pixels_with(session, pixels: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """An engine session over ``pixels`` in batches of ``SCORING_BATCH`` -> scores (n,), maps (n, H, W)."""
    scores, maps = [], []
    for start in range(0, len(pixels), SCORING_BATCH):
        batch_maps, batch_scores = session(np.ascontiguousarray(np.stack(pixels[start: start + SCORING_BATCH])))
        scores.append(batch_scores)
        maps.append(batch_maps)
    return np.concatenate(scores), np.concatenate(maps)


def int8_header(metadata: dict, scores: Optional[np.ndarray], maps: Optional[np.ndarray],
                pixel_target: float = cal.DEFAULT_TARGET_PIXEL_FPR, keep: Optional[np.ndarray] = None,
                held_out_sha256: Optional[Sequence[str]] = None) -> dict:
    """The model header of an int8 export: ``metadata`` (the model file's) with every threshold,
    source and calibration score replaced by those of the int8 scores of the held-out images
    (``scores`` (n,), ``maps`` (n, H, W)), at the model's target FPR and ``pixel_target`` (the
    header's, else the loaded model's); none when the model has no calibration images. keep:
    (H, W) bool, the pixels that count (a model with an ignore mask: the others are not in the
    pixel quantiles, as in its fit). held_out_sha256: the SHA-256 of the images ``scores`` are of,
    recorded as the header's ``CALIBRATION_HASHES_KEY``: which images calibrated this export."""
    header = {**metadata, "stale_images": None, "calibrated_sources": None, "thresholds_note": None,
              CALIBRATION_HASHES_KEY: None if held_out_sha256 is None else list(held_out_sha256)}
    thresholds = dict.fromkeys(("image_threshold", "pixel_threshold", "threshold_source", "pixel_threshold_source"))
    if scores is None or not len(scores):
        return {**header, **thresholds, "calibration": None,
                "thresholds_from": "none: the model has no held-out images (give thresholds by hand)"}
    calibration = cal.Calibration.from_scores(scores, maps if keep is None else maps[:, keep], "holdout")
    target = metadata.get("target_fpr") or cal.DEFAULT_TARGET_FPR
    pixel_target = metadata.get("target_pixel_fpr") or pixel_target
    point = cal.operating_point(calibration, cal.OperatingPoint(), target, target_pixel_fpr=pixel_target)
    return {**header, "image_threshold": point.image_threshold, "pixel_threshold": point.pixel_threshold,
            "threshold_source": point.source, "pixel_threshold_source": point.pixel_source, "target_fpr": target,
            "target_pixel_fpr": pixel_target,
            "calibration_method": "holdout", "n_calibration_images": calibration.n,
            "calibration": calibration_record(calibration),
            "thresholds_from": f"int8 graph, {calibration.n} held-out images"}


def export_int8(model_path, train_images: Sequence, output, weights: Optional[str] = None, model=None,
                n_images: int = QUANTIZATION_IMAGES, refit: bool = True) -> Path:
    """``padim export --precision int8``: the model file ``model_path`` exported to the folder
    ``output`` as an int8 OpenVINO IR, quantised on up to ``n_images`` of its fit's training images
    (evenly spread), its Gaussians refitted on the int8 features of the fit's images (``refit``;
    ``refit_gaussians``) and its thresholds recomputed with the int8 graph on its held-out images,
    all found in ``train_images`` (the training folder it was fitted on, sorted). Returns the folder."""
    from padim.core.estimator import PaDiM
    from padim.deploy.export import export_model, file_metadata, graph_key

    if int(n_images) < 1:
        raise PadimError(f"`quantization_images` must be at least 1, got {n_images}")
    _nncf()
    metadata, key = file_metadata(model_path), graph_key(model_path)
    hashes = [file_sha256(image) for image in train_images]  # every image read once, before any other work
    fit_images, held_out = held_out_split(metadata, train_images, hashes)
    sha_of = dict(zip(map(str, train_images), hashes))
    if model is None:
        model = PaDiM.load(model_path, device="cpu", weights=weights)
    chosen = sorted(set(np.linspace(0, len(fit_images) - 1, min(int(n_images), len(fit_images))).round().astype(int)))
    pixels = decoded([fit_images[i] for i in chosen], model.config_)
    digest = images_digest(train_images, hashes)
    scorer = None
    Path(output).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=output) as work:  # the refit's graph (GBs at d = 550)
        if refit:
            mean, factor = refit_gaussians(model, fit_images, pixels, Path(work))
            scorer = with_gaussians(model, mean, factor)

        def step(onnx_path: Path, folder: Path, header: dict):
            import openvino as ov

            quantised, done = quantized_model(onnx_path, pixels)
            xml = folder / GRAPH_FILES["openvino"]
            ov.save_model(quantised, str(xml), compress_to_fp16=False)
            scores = maps = None
            if held_out:
                session = open_session(folder, {"graph": xml.name, "graph_format": "openvino", PRECISION_KEY: "int8"},
                                       "openvino", "int8")
                scores, maps = score_pixels_with(session, decoded(held_out, model.config_))
                del session
            done.update(images=len(chosen), held_out=len(held_out), training_images_sha256=digest,
                        gaussians=(f"refitted on int8 features of the {len(fit_images)} fit images" if refit
                                   else "the model file's (fitted on f32 features)"))
            keep = model.scorer_.keep
            header = int8_header(header, scores, maps, model.target_pixel_fpr,
                                 None if keep is None else keep.bool().cpu().numpy(),
                                 [sha_of[str(image)] for image in held_out])
            return [xml, xml.with_suffix(".bin")], header, {PRECISION_KEY: "int8", QUANTIZATION_KEY: done}

        return export_model(model, output, "openvino", metadata=metadata, key=int8_graph_key(key), graph_step=step,
                            scorer=scorer)
