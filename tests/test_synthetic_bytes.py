"""The synthetic cohort's files are pinned byte for byte (SHA-256 of every file).

Prepared caches, their keys and published results depend on these bytes, so a change of the
generator (a faster rendering, another NIfTI writer, parallel workers) must leave every NIfTI,
Info.cfg, parameters.csv and acquisition_ranges.json exactly as it was. The digests were taken
from the generator before its rendering and writing were made faster.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from data_pipelines import synthetic
from tests.conftest import tree_files

# Three small subjects with their 4-chamber views: cheap enough to write in every run.
SMALL_RANGES = synthetic.AcquisitionRanges(image_size=(144, 160), spacing_mm=(1.7, 1.8),
                                           num_frames=(10, 12), num_slices=(6, 8))
SMALL_SEED = 5
SMALL_COHORT_SHA256 = {
    "acquisition_ranges.json": "0d8ef696e3d4a66deb3bdfbf401ba7e4bd14ee57a5a87b337defc03b9dd2a6ff",
    "parameters.csv": "6e4962dcf8514fbe552fd5c89612310b8be015c7f92145c3ee921177641b4d2d",
    "training/patient001/Info.cfg":
        "bd38fa022b6aea346011d0477444e481beb1dc5113da0066d8a05ec6285c435e",
    "training/patient001/patient001_4d.nii.gz":
        "398c404ef4e2c3cff6a507d0baae95b1d5bdecf59bfb318ca15b305094c360b2",
    "training/patient001/patient001_4d_gt.nii.gz":
        "e424d5d3e1cb0a812326971841f93b0eb28f3b6c35026b088f686be919ac4f96",
    "training/patient001/patient001_frame01.nii.gz":
        "f7e557818f54b86bbab20c0a5fdb2c7031d74f77173e7b62bec463fdbdd22e6c",
    "training/patient001/patient001_frame01_gt.nii.gz":
        "b1effc5d0f0f89cd43d7e665afa088f3cc67f85b5b3dbc84a747fb4a2e5b04f4",
    "training/patient001/patient001_frame05.nii.gz":
        "44b0d1415705ef20833600a6eec55c6218024268f19224e05f003ef3c099c66b",
    "training/patient001/patient001_frame05_gt.nii.gz":
        "a0f57dc9d0337d74d06be1791e5d1141a3944eee28732642f3906ee1685cad70",
    "training/patient001/patient001_la_4ch.nii.gz":
        "a821304c0de6f89c319525230ac19c356bfa89b64b2a3cb7f3e7652460d6fe59",
    "training/patient001/patient001_la_4ch_gt.nii.gz":
        "30a4c080cc133a0b1356df331f6722d58ec24a2a927168b09044285dab688d7b",
    "training/patient002/Info.cfg":
        "ed7772f7c408ec982dd8c4d9de4a3c572bb2e00a0735a7a385072b6275351548",
    "training/patient002/patient002_4d.nii.gz":
        "43541837956ab5ffdf3d431dcfd634f2f3c199db03613ae8435ca533d74359fe",
    "training/patient002/patient002_4d_gt.nii.gz":
        "8b01b1747e1aeb499271d7214c2eceed322d3a10db884d9b5729fc2f77ea08e6",
    "training/patient002/patient002_frame01.nii.gz":
        "e5828b53f88be3bf8f8492e801f8d4dcf63b716be31b8ac7f5a78b9b2042cf9f",
    "training/patient002/patient002_frame01_gt.nii.gz":
        "bbe2c35e65dd906e53fc67f6b06598506f1c26e07faefe31f1d968003027397a",
    "training/patient002/patient002_frame05.nii.gz":
        "958f2856772147af830f671186c4c9a6751e791fe5fa1746801a7adc895a408f",
    "training/patient002/patient002_frame05_gt.nii.gz":
        "88657384af3e125c8ddeb97646df94325ceebbcc85d44e4ceab897d8f77c697d",
    "training/patient002/patient002_la_4ch.nii.gz":
        "e83eb18cffccf23041a6482ff228b41b819da9653510b6718eeeeb470bedb36b",
    "training/patient002/patient002_la_4ch_gt.nii.gz":
        "dc216d8efcfb1881232b0dd73d3575bb4871ea11567c120842e496ee15ed9a3a",
    "training/patient003/Info.cfg":
        "0f44dab2216642f720773b0c1fa3ccdf32f8a2e5b4556577b7100ccd4357341c",
    "training/patient003/patient003_4d.nii.gz":
        "6b5c07b36462ccbe5a79365b86d65eba8fdd1d0e91dd7117063a135cca4f31c8",
    "training/patient003/patient003_4d_gt.nii.gz":
        "1e6c7046362bf703928dfbf41f931b20f9a6edfbc74dc18e9b382de89ae779ae",
    "training/patient003/patient003_frame01.nii.gz":
        "009cd5097d4eb9e21b27522e75d7b8182700814b370299aa8ae24effd5f035e4",
    "training/patient003/patient003_frame01_gt.nii.gz":
        "b4bbb7c43e21b51abb6ecbd1adb505fb7f123296361df7b4ca86715b3ea2c902",
    "training/patient003/patient003_frame04.nii.gz":
        "c7b78fac1346da344bf6b00c885af188b11eed03540eb1a156e384e2a87a1009",
    "training/patient003/patient003_frame04_gt.nii.gz":
        "0b5ab06dac4484e47798af9e4ce5918031657b38ae11bebca5e130dc1b8842eb",
    "training/patient003/patient003_la_4ch.nii.gz":
        "225938fa583621e74c98837f44f99a77658dc79795b20b047d957b2c85dbf22a",
    "training/patient003/patient003_la_4ch_gt.nii.gz":
        "b95abb967c5b8d5e65b5d984d8a24b624e1578cb87727a95b0bad020768c027b",
}

# The first subject of the default cohort (seed 0, default acquisition ranges), as every first
# run of a synthetic config writes it.
DEFAULT_SUBJECT_SHA256 = {
    "Info.cfg": "3c3daec3b2b0c74e4a65faa5a9e63e84ba6555d09470bbe9a96ec9494bcd59e9",
    "patient001_4d.nii.gz": "c1ceda3925150a04cdb25ed2bdac9bfbd6a3e0d22259b1e8d192ac62c67e5ce0",
    "patient001_4d_gt.nii.gz": "283a3db1991f90f0c668aedf944d90eeac78abf92f4f1fe7be76cb13bbfb93e4",
    "patient001_frame01.nii.gz":
        "1b4f36e1c0418ed2175ef562a6f6698ddb1cb871ee754f9e970a233d5558aa67",
    "patient001_frame01_gt.nii.gz":
        "8877fb02fec64eb4ebc257345771b5bfa5e373108532ea5eb20ad6e6572eb6cc",
    "patient001_frame10.nii.gz":
        "f05d6474d2411e2d7ed55f92714611a14bb903f94faa1e7249fc2849d0b99d9c",
    "patient001_frame10_gt.nii.gz":
        "659c851c9497113fbde0927deb286412f780a8f38c0915a5c19db3e75f5e101a",
}


def _digests(root: str) -> dict[str, str]:
  """{path relative to root: SHA-256} of every file under root."""
  return {path: hashlib.sha256(data).hexdigest() for path, data in tree_files(root).items()}


def _assert_same(digests: dict[str, str], expected: dict[str, str]) -> None:
  assert sorted(digests) == sorted(expected)
  changed = [name for name in expected if digests[name] != expected[name]]
  assert not changed, f"files whose bytes changed: {changed}"


@pytest.mark.parametrize("num_workers", [1, 2])
def test_small_cohort_with_long_axis_is_byte_identical(tmp_path, num_workers):
  root = str(tmp_path / "cohort")
  synthetic.synthesize_cohort(root, 3, SMALL_SEED, ranges=SMALL_RANGES, long_axis_4ch=True,
                              num_workers=num_workers)
  _assert_same(_digests(root), SMALL_COHORT_SHA256)


def test_first_subject_of_the_default_cohort_is_byte_identical(tmp_path):
  root = str(tmp_path / "cohort")
  synthetic.synthesize_cohort(root, 1, 0)
  _assert_same(_digests(os.path.join(root, "training", "patient001")), DEFAULT_SUBJECT_SHA256)
