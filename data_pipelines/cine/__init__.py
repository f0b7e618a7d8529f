"""Cine data path: raw cine series -> prepared tfds dataset -> deterministic (B, T, ...) batches.

The input of the temporal VAE-classifier (Clough et al., section 3: T frames of the 3 central
short-axis slices, LV blood-pool volume curve) and of the 3D diffusion autoencoder (Ometto et
al. 2024, input: a cine as a (T, H, W) volume, long-axis 4-chamber view cropped around the
heart from the temporal-variance mask, per-volume min-max to [-1, 1]).

Raw layouts (`DATASETS`):
- "synthetic": the ACDC layout of `data_pipelines.synthetic` (Info.cfg, <s>_4d.nii.gz, labels of
  every frame <s>_4d_gt.nii.gz, optional 4-chamber <s>_la_4ch.nii.gz with its labels
  <s>_la_4ch_gt.nii.gz). ED from Info.cfg.
- "ukbb": converted UK Biobank NIfTI, one folder per subject: sa.nii.gz (X, Y, Z, T) short-axis
  cine, la_4ch.nii.gz (X, Y, 1, T) 4-chamber cine (optional unless the long axis is required),
  seg_sa.nii.gz (X, Y, Z, T) optional labels of every frame in the UK Biobank convention
  (LV=1, Myo=2, RV=3; `label_convention`, remapped by `structures.remap_labels`). The series
  are ECG-triggered, so ED is frame 0 (without labels) or the frame of largest LV volume.
Every file is read by `nifti.read_nifti` (defensive decoding); every problem of a subject raises
`InvalidInputError` naming the file, which the preparation records as that subject's reason.

Prepared example (one per subject; array fields `config.ARRAY_FIELDS`), T = num_frames,
S = image_size:
- subject (str), group (int32 index into structures.GROUPS, -1 when unknown, e.g. UK Biobank);
- sa_image (T, S, S, 3) in [0, 1]: the 3 central short-axis slices (middle of the
  slices where RV, myocardium and LV all appear at ED) as channels, apex-ward last, after
  `preprocess.align_slice` (resampled to spacing_mm, LV-centred, rotated to the canonical
  LV -> RV axis; the ED transform for every frame) and `preprocess.normalize_intensity` between
  the 1st and 99th percentiles of the subject's three slices over all frames;
- sa_label (T, S, S, 3) uint8 canonical labels of the same pixels (nearest neighbour);
- lv_volume_ml (T,) float32: LV blood-pool volume of the whole stack in each frame (the source
  frame nearest in time, like the labels); NaN without labels;
- pixel_spacing_mm: in-plane spacing of sa_image/sa_label (= spacing_mm; in batches resized
  to data.image_size, scaled accordingly); slice_thickness_mm: the source's slice spacing;
- sa_mid_image (T, S, S, 1) in [-1, 1]: the middle slice of sa_image before
  normalisation, min-max per volume then (x - 0.5) / 0.5;
- la_image (T, S, S, 1) in [-1, 1] (when the configuration has the long axis): the
  4-chamber cine resampled to spacing_mm, an S x S window centred on the bounding box of the
  largest connected region of pixels whose temporal variance exceeds variance_fraction x its
  image mean (after morphological opening and closing), min-max per volume, (x - 0.5) / 0.5;
- la_label (T, S, S, 1) uint8 (with la_image): the 4-chamber labels of the same pixels
  (nearest neighbour; 0 background, 1 RV, 2 LV myocardium, 3 LV blood pool, 4 LA, 5 RA,
  `structures.NUM_LONG_AXIS_LABELS`), all 0 when the source has none (UK Biobank).
The image fields are computed in float32 and stored as float16 (`STORED_IMAGE_DTYPE`: 11
significant bits, finer than the 12-bit range of a scanner's magnitude images); batches hold
them as float32 again. Half-size records halve the read and parse time of an example, which
bounds the input pipeline's speed (benchmarks/README.md).
Time: frames are resampled to T over one cycle starting at ED: source position
ED + k T_src / T (cyclic), images linearly, labels by the nearest frame.

Preparation (`prepare_cine_dataset`) writes the same files as data_pipelines/prepare.py
(tfds/ array_record, attributes.csv for labelled subjects, splits.json, report.json last) with
the same guarantees, through the same driver (`prepare.run_preparation`): the per-subject
outcomes are kept in O/.subjects/subjects/ as soon as computed, so an interrupted run resumes
where it stopped; a rerun after the input files changed prepares only the changed and new
subjects; a broken or implausible subject (blank frames, labels whose volumes or ejection
fraction `CineConfig.bounds` refuse, a structure lost in the crop) is "skipped" with its
reason. Splits are subject-level, stratified by
group (`subject_splits.stratified_split`), fractions configurable. `held_out_cine_dir` generates
and prepares, once, extra synthetic subjects of one group that a run never saw (the TCAV
concept pool), acquired and prepared like the run's synthetic cohort.

Batches (`make_data_source(config)`): the training batch at global step k is a pure function of
(config.seed, k) as in data_pipelines/pipeline.py (same index schedule and augmentation draws:
`pipeline.train_batch_indices`, `pipeline.augment_transforms`), process p of P keeps rows
[p B/P, (p+1) B/P). Augmentation (training only, config.data.augment): integer in-plane shifts
up to max_shift_px, optional zoom, horizontal flip with flip_prob; one map per sequence, applied
to every frame and to every image field and the labels alike (nearest for labels). Fields are
resized from the stored size to config.data.image_size when they differ (area averaging when
shrinking, nearest for labels). Fill outside the shifted image: 0 for [0, 1] images and labels,
-1 for [-1, 1] images. `fields` (train_batches, eval_batches, make_data_source) restricts the
array fields that are copied, transformed and returned to the ones a model reads (a model
family's `batch_fields`); lv_volume_ml, group, subject and the scalars always come along.

Modules (every public name is also available here, as `cine.<name>`): `config` (format
constants, `CineConfig`, reading config.data), `reading`, `preprocessing`, `outcomes` (one
subject, the work area), `builder` (tfds builder, `prepare_cine_dataset`), `prepared` (a run's
prepared and held-out datasets in the cache), `batches`.
"""

from __future__ import annotations

from data_pipelines.cine.config import (DATASETS, VIEWS, UKBB_SHORT_AXIS, UKBB_LONG_AXIS,
                                        UKBB_SEGMENTATION, NUM_SHORT_AXIS_SLICES, UNKNOWN_GROUP,
                                        FORMAT_VERSION, STORED_IMAGE_DTYPE, ARRAY_FIELDS,
                                        CineConfig, data_field, cine_config_from, cache_root,
                                        synthetic_raw_dir)
from data_pipelines.cine.reading import (CineSubject, read_synthetic_cine, read_ukbb_cine,
                                         find_cine_subjects, read_cine_subject)
from data_pipelines.cine.preprocessing import (resampled_frame_positions, resample_time,
                                               central_slices, heart_mask, heart_crop_centre,
                                               crop_around, to_symmetric_range, preprocess_cine)
from data_pipelines.cine.outcomes import prepare_subject, run_subject, save_outcome, load_example
from data_pipelines.cine.builder import (CineBuilderConfig, make_builder_config, cine_features,
                                         CardiacCine, prepare_cine_dataset)
from data_pipelines.cine.prepared import (prepared_cine_dir, HELD_OUT_GROUP, HELD_OUT_SPLIT,
                                          held_out_cine_dir)
from data_pipelines.cine.batches import train_batches, eval_batches, make_data_source
