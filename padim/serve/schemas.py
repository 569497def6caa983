"""Pydantic models of every answer: they are the contract /docs (OpenAPI) shows."""

from __future__ import annotations

from typing import List, Optional

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """Every error answer: one line saying what went wrong and what to do."""

    detail: str


class Health(BaseModel):
    status: str = Field(description="ready, warming (models loaded, first passes running), stopping, or failed")
    models: List[str]
    detail: Optional[str] = None


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
    heatmap: Optional[Heatmap] = Field(None, description="with ?heatmap=true")


class Prediction(BaseModel):
    model: str
    engine: str = Field(description="what scored: torch, onnxruntime or openvino")
    warnings: List[str] = Field(description="e.g. a target FPR the calibration images cannot guarantee")
    results: List[ImageResult]
