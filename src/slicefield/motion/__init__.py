"""Motion: stack-to-stack rigid registration, slice-to-volume correction, outlier slices, bias field.

Frames (see :mod:`slicefield.geometry`): every transform here is a rigid ``(4, 4)`` **world -> world** map in world
mm RAS that acts on the left of a pose: ``corrected slice_to_world = T @ header slice_to_world``. A pose
(``slice_to_world``) maps slice-frame mm to world mm RAS. Motion correction edits poses only; slice values are
untouched, except for the optional intensity scaling and bias-field correction, which are reported separately.

Modules, in pipeline order:

- :mod:`~slicefield.motion.bias`: N4 bias-field correction of each stack (SimpleITK).
- :mod:`~slicefield.motion.register`: stack-to-stack rigid registration (SimpleITK, Mattes MI or correlation,
  multi-resolution, initialised from the headers).
- :mod:`~slicefield.motion.slice_to_volume`: one slice (or a package of slices) registered to a volume through a
  fast twin of the forward model (Levenberg-Marquardt on its six rigid parameters).
- :mod:`~slicefield.motion.svr`: the alternation SRR -> slice registration -> SRR, coarse to fine, with robust
  per-slice weights, outlier rejection and per-slice intensity scaling.
- :mod:`~slicefield.motion.report`: per-slice transforms as JSON and the motion / excluded-slice plot.
- :mod:`~slicefield.motion.coverage`: how densely slices at their (corrected) poses sample each voxel; motion
  leaves gaps that even the true poses cannot fill.
"""
