"""Synthesis of 3D T1 brains from tissue label maps (issue 6): three per-plane 2D SPADE generators whose volumes
a 3D CNN fuses.

Data flow, one module each:

- :mod:`.labels`: tissue label maps (Gaussian mixture or MNI152 GM/WM maps) and pairs folders.
- :mod:`.augment`: a population of pairs by random affine + elastic deformations (same on label and image) and
  intensity variation (sample, then apply deterministically).
- :mod:`.spade`: the 2D SPADE generator, multi-scale PatchGAN, hinge and feature-matching losses.
- :mod:`.fusion`: the 3D fusion CNN and patch-blended inference.
- :mod:`.model`: configs and presets, training, generation, model folders.
- :mod:`.evaluate`: SSIM / PSNR / MSE, per-axis sharpness and through-plane consistency, profiles, reader sheet.

torch is imported by :mod:`.spade`, :mod:`.fusion` and :mod:`.model` only.
"""
