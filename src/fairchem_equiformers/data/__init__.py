"""Dataset builder: OC20-style LMDBs for fairchem 1.10, from ASE's EMT or from the user's files.

``build_emt_dataset`` generates adsorbate/slab systems with EMT (S2EF and IS2RE/IS2RS splits);
``convert_user_data`` converts any labelled file ASE reads. Both also write the fitted
``element_references.pt`` and ``normalizers.pt``, ``manifest.json`` and a ``dataset.yml`` config
section. The console script is ``fairchem-equiformers-data`` (``cli``).
"""

from .build import BuildReport, build_emt_dataset
from .convert import convert_user_data
from .errors import DataBuildError

__all__ = ["BuildReport", "DataBuildError", "build_emt_dataset", "convert_user_data"]
