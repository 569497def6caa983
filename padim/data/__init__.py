"""Data sets: the MVTec AD folder layout, and synthetic categories generated in code."""

from padim.data.mvtec import MVTEC_CATEGORIES, Category, TestSample, find_category, list_images

__all__ = ["MVTEC_CATEGORIES", "Category", "TestSample", "find_category", "list_images"]
