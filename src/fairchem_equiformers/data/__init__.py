"""Dataset builder: OC20-style LMDBs for fairchem 1.10, from ASE's EMT or from the user's files.

``build_emt_dataset`` generates adsorbate/slab systems with EMT (S2EF and IS2RE/IS2RS splits);
``convert_user_data`` converts any labelled file ASE reads; ``molecules`` (MD17 style) and ``qm9``
label small molecules with GFN2-xTB. Every source goes through one pipeline (``pipeline``) that
also writes the fitted ``element_references.pt`` and ``normalizers.pt``, ``manifest.json`` and a
``dataset.yml`` config section. The console script is ``fairchem-equiformers-data`` (``cli``).
"""

from .build import build_emt_dataset
from .convert import convert_user_data
from .errors import DataBuildError
from .pipeline import BuildReport

__all__ = ["BuildReport", "DataBuildError", "build_emt_dataset", "convert_user_data"]
