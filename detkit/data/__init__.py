"""Datasets, validation, conversion, transforms and data modules."""

from detkit.data.coco import CategoryMap, CocoDetection
from detkit.data.validate import DatasetError, UnusableInputError, ValidationReport, validate_coco

__all__ = ["CategoryMap", "CocoDetection", "DatasetError", "UnusableInputError", "ValidationReport", "validate_coco"]
