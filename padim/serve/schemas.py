"""Pydantic models of every answer: they are the contract /docs (OpenAPI) shows."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """Every error answer: one line saying what went wrong and what to do."""

    detail: str


class Health(BaseModel):
    status: str = Field(description="ready, warming (models loaded, first passes running), stopping, or failed")
    models: List[str]
    detail: Optional[str] = None


class DriftBrief(BaseModel):
    alarm: bool = Field(description="a drift alarm is on (latched until POST /models/{name}/drift/reset or a new "
                                    "version); the full state: GET /models/{name}/drift")
    streams_alarmed: List[str] = Field(description="'all' alone: more defects than usual; 'all' and 'good': the "
                                                   "picture changed")
    log10: Dict[str, float] = Field(description="log10 of each stream's martingale; alarm at log10(1 / delta)")
    images_seen: int
    delta: float = Field(description="each stream's false-alarm probability (padim serve --drift-delta)")


class VersionInfo(BaseModel):
    sha256: Optional[str] = Field(description="SHA-256 of the model file (of an export's padim.json)")
    fit_date: Optional[str]
    file: str
    loaded_at: str
    state: str = Field(description="serving, draining (answering the requests it took before a swap) or retired")
    retired_at: Optional[str]
    requests_in_flight: int


class ReloadError(BaseModel):
    time: str
    file: Optional[str]
    sha256: Optional[str]
    error: str = Field(description="why the file was refused; the version before it keeps serving")


class ModelInfo(BaseModel):
    name: str = Field(description="the model file's stem: POST /models/{name}/predict")
    aliases: List[str] = Field(description="other names it answers to (its category, when unambiguous)")
    engine: str = Field(description="what scores: torch, onnxruntime or openvino (padim serve --engine)")
    precision: str = Field(description="the engine's inference precision: f32, or bf16 or int8 (openvino)")
    category: Optional[str]
    backbone: str
    weights: Optional[str]
    random_weights: bool = Field(description="fitted with untrained weights (tests only): its scores mean nothing")
    image_size: List[int] = Field(description="[height, width] the model resizes images to")
    crop: Optional[List[int]]
    n_features: int = Field(description="d, the channels kept per patch")
    image_threshold: Optional[float]
    threshold_source: Optional[str]
    pixel_threshold: Optional[float]
    pixel_threshold_source: Optional[str]
    target_fpr: Optional[float]
    n_calibration_images: int
    calibration_method: Optional[str]
    fit_date: Optional[str]
    n_train_images: int
    thresholds_from: Optional[str] = Field(None, description="which scores the thresholds were computed from: "
                                           "\"f32 scores (the model file's thresholds)\", an int8 export's own "
                                           "(\"int8 graph, 20 held-out images\"), or \"none\"")
    sha256: Optional[str] = Field(None, description="the version serving: SHA-256 of its model file")
    loaded_at: Optional[str] = None
    versions: List[VersionInfo] = Field([], description="the versions loaded, newest first (the last 10)")
    last_reload_error: Optional[ReloadError] = Field(None, description="the newest file of this name that was "
                                                                       "refused, until one loads")
    drift: Optional[DriftBrief] = Field(None, description="null for a model without calibration")
    live_accuracy: Dict[str, Any] = Field({}, description="per version (SHA-256) given operators' verdicts: false "
                                          "alarms among pictures confirmed good, missed defects among those confirmed "
                                          "defect, each with a 95 % Clopper-Pearson interval, and a warning when false "
                                          "alarms are above the target beyond it")


class Heatmap(BaseModel):
    covers: str = Field(description="image: the whole picture; crop: the centre crop the model saw")
    overlay_png: str = Field(description="base64 PNG: heatmap over the picture, long side <= 1024 px")
    overlay_width: int
    overlay_height: int
    mask_png: Optional[str] = Field(description="base64 1-bit PNG: defect where the map >= the pixel threshold, "
                                                "at the picture's full size; null without a pixel threshold")
    map_png: str = Field(description="base64 8-bit PNG of the anomaly map at the model's input size: "
                                     "value = map_min + v / 255 * (map_max - map_min)")
    map_min: float
    map_max: float
    map_width: int
    map_height: int


class ImageResult(BaseModel):
    index: int = Field(description="position of the file in the request")
    file: str = Field(description="the file name the client sent (echoed, never used as a path)")
    error: Optional[str] = Field(None, description="why this file was not scored; the other fields are then null")
    width: Optional[int] = None
    height: Optional[int] = None
    score: Optional[float] = Field(None, description="image anomaly score (the anomaly map's maximum)")
    p_value: Optional[float] = Field(None, description="conformal p-value against the model's calibration images "
                                                       "(small: unusual for a good image); null without calibration")
    label: Optional[str] = Field(None, description="good or anomalous (score >= threshold); null without a threshold")
    threshold: Optional[float] = None
    threshold_source: Optional[str] = None
    pixel_threshold: Optional[float] = None
    pixel_threshold_source: Optional[str] = None
    drift_log10: Optional[float] = Field(None, description="log10 of the drift martingale (stream all) once this "
                                                           "image was fed; null without calibration")
    heatmap: Optional[Heatmap] = Field(None, description="with ?heatmap=true")


class Prediction(BaseModel):
    model: str
    engine: str = Field(description="what scored: torch, onnxruntime or openvino")
    model_sha256: Optional[str] = Field(None, description="the version that scored: SHA-256 of its model file")
    fit_date: Optional[str] = None
    request_id: str = Field(description="names this request in the decision log and in POST "
                                        "/models/{name}/feedback")
    warnings: List[str] = Field(description="e.g. a target FPR the calibration images cannot guarantee")
    drift: Optional[DriftBrief] = None
    results: List[ImageResult]


class Feedback(BaseModel):
    request_id: str = Field(max_length=200)
    index: int = Field(ge=0, description="the image's index in that request")
    truth: str = Field(pattern="^(good|defect)$", description="the operator's verdict: good or defect")


class Recalibrate(BaseModel):
    since: Optional[str] = Field(None, max_length=64, description="ISO 8601 date and time with a zone: only "
                                 "pictures scored at or after it (default: all of the sample, which restarts at "
                                 "each drift alarm)")
    include_unconfirmed: bool = Field(False, description="also the sampled pictures no operator gave a verdict on "
                                      "(never those marked defect)")
    target_fpr: Optional[float] = Field(None, gt=0, lt=1, description="default: the model's own")


class RecalibrateAnswer(BaseModel):
    model: str
    previous_sha256: Optional[str]
    sha256: Optional[str] = Field(description="the new version serving")
    kept_previous: str = Field(description="the previous model file, kept beside the new one (not served)")
    pictures: int = Field(description="pictures the new thresholds come from")
    counts: Dict[str, int] = Field(description="the sample: sampled, confirmed_good, unconfirmed, defect, older")
    since: Optional[str]
    image_threshold: Dict[str, Optional[float]] = Field(description="before and after")
    threshold_source: Optional[str]
    pixel_threshold: Optional[float]
    guarantee: str


class FeedbackAnswer(BaseModel):
    verdict: str
    truth: str
    override: bool = Field(description="the operator disagrees with the model")
    feedback: int
    overrides: int
    override_rate: Optional[float]
    missed_defects: int
    false_alarms: int
    counts: Dict[str, int]


class Reload(BaseModel):
    time: str
    loaded: List[Dict[str, Any]]
    refused: List[Dict[str, Any]]
    removed: List[str]
    unchanged: int
    errors: Dict[str, Any] = Field(description="files refused (by model name) until one of that name loads")
    error: Optional[str] = None
