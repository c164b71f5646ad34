"""Mobility data for next-location prediction.

* :mod:`~hsoftmax.data.synthetic`: synthetic human-mobility generator with presets ``diy``,
  ``geolife``, ``small``.
* :mod:`~hsoftmax.data.staypoints`: staypoint / location CSV loaders with validation.
* :mod:`~hsoftmax.data.samples`: MHSA-protocol sample building, MHSA pickle IO, preset cache.
* :mod:`~hsoftmax.data.dataset`: ``torch`` Dataset and ``collate``.
* :mod:`~hsoftmax.data.baselines`: most-frequent and Markov baselines.

Counts of dropped or clipped records are logged on the ``hsoftmax.data`` logger.
"""

from .baselines import run_baselines
from .dataset import MobilityDataset, collate
from .samples import (
    MobilityData,
    SampleSet,
    build_samples,
    default_cache_dir,
    load_mhsa,
    load_preset,
    save_mhsa,
)
from .sources import MHSA_SETTINGS, load_dir, parse_split
from .staypoints import DataFormatError, read_locations, read_staypoints, validate_staypoints
from .synthetic import PRESETS, SynthConfig, generate, get_preset, write_csv

__all__ = [
    "DataFormatError",
    "MobilityData",
    "MobilityDataset",
    "PRESETS",
    "SampleSet",
    "SynthConfig",
    "build_samples",
    "collate",
    "default_cache_dir",
    "generate",
    "get_preset",
    "load_dir",
    "load_mhsa",
    "MHSA_SETTINGS",
    "parse_split",
    "load_preset",
    "read_locations",
    "read_staypoints",
    "run_baselines",
    "save_mhsa",
    "validate_staypoints",
    "write_csv",
]
