"""The synthetic short-axis cine MRI cohort: the default data of every model.

Each subject is a 2D+time stack of short-axis balanced-SSFP (bSSFP) cine images in the ACDC
layout (`data_pipelines.acdc`), with labels for every frame and the parameters that
generated it. The generator has two separate halves so other renderers (e.g. a long-axis
4-chamber view) can reuse the same subjects:

1. `sample_subject_parameters` draws a `SubjectParameters`: diagnostic group (the five ACDC
   groups NOR, MINF, DCM, HCM, RV), body size, target LV/RV volumes and ejection fractions,
   timing of the cardiac cycle, heart shape, position and orientation, acquisition geometry and
   image contrast.
2. `render_short_axis` turns those parameters into images and labels.

Modules (every public name is also available here, as `synthetic.<name>`):
- `parameters`: `SubjectParameters`, `AcquisitionRanges`, subject ids and balanced groups, the
  cardiac-cycle volume curve;
- `sampling`: `sample_subject_parameters` by diagnostic group;
- `geometry`: the heart model (boundary tables per slab and frame);
- `short_axis`: the short-axis images, labels and affine;
- `long_axis`: the long-axis 4-chamber view of the same heart;
- `layout`: the ACDC layout on disk (subject files, parameters.csv, acquisition ranges);
- `cohort`: deterministic per-subject streams, whole and held-out cohorts;
- `preview`: preview figures and the LV volume curve measured from labels.
"""

from __future__ import annotations

from data_pipelines.synthetic.parameters import (AcquisitionRanges, SubjectParameters, subject_name,
                                                 group_of_subject, cardiac_cycle_volume)
from data_pipelines.synthetic.sampling import sample_subject_parameters
from data_pipelines.synthetic.geometry import (ShortAxisGeometry, IMAGE_BOUNDARIES,
                                               short_axis_geometry, heart_extent_mm)
from data_pipelines.synthetic.short_axis import render_short_axis, short_axis_affine
from data_pipelines.synthetic.long_axis import (LONG_AXIS_4CH, long_axis_generator, LongAxisView,
                                                LongAxisGeometry, sample_long_axis_view,
                                                long_axis_geometry, long_axis_affine,
                                                render_long_axis_4ch)
from data_pipelines.synthetic.layout import (PARAMETERS_CSV, ACQUISITION_RANGES_JSON, PARTITION,
                                             info_cfg_text, write_acdc_subject, subject_is_complete,
                                             long_axis_files, long_axis_is_complete,
                                             write_long_axis_subject, write_parameters_csv,
                                             write_acquisition_ranges, read_acquisition_ranges,
                                             read_parameters_csv)
from data_pipelines.synthetic.cohort import (HELD_OUT_STREAM_TAG, subject_generator,
                                             synthesize_cohort, synthesize_held_out_cohort)
from data_pipelines.synthetic.preview import (lv_volume_curve_from_labels, save_cohort_preview,
                                              save_long_axis_preview)
